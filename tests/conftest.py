"""Shared fixtures: a tiny corpus, tiny configs, and a way to run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tiny models are overhead-bound: one thread is as fast, and it keeps parallel test runs (and a
# loaded 2-core machine) from oversubscribing the CPU.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # and minigpt's auto thread setting keeps it (device.py)

SRC = Path(__file__).resolve().parents[1] / "src"

# Small enough to train in a second, varied enough that loss visibly falls.
CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, eval_iters=2,
            sample_tokens=0, warmup_iters=2)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS, encoding="utf-8")
    return p


def run_cli(*args: str, check: bool = False, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m minigpt ARGS` the way a user would, importing this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "minigpt", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"minigpt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def cli_flags(**values) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out
