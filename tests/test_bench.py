"""`minigpt bench train|generate` run end to end on tiny settings and end with one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import cpu
from minigpt.cpu import configure_threads

SRC = Path(__file__).resolve().parents[1] / "src"


def minigpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minigpt", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=240)


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 60, encoding="utf-8")
    return path


def test_bench_train_prints_figures_and_json(tmp_path):
    r = minigpt("bench", "train", "--data", str(corpus(tmp_path)), "--n-layer", "1", "--n-embd",
                "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4", "--iters", "3",
                "--warmup", "1", "--arch", "modern", "--optimizer", "muon", "--threads", "1",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["bench"] == "train" and result["arch"] == "modern" and result["threads"] == 1
    assert result["tokens_per_sec"] > 0 and result["ms_per_iter"] > 0
    # Throughput is tokens per step (batch 4 x context 16) over the step time; the printed
    # figures are rounded, so the product agrees to about a percent.
    assert result["tokens_per_iter"] == 4 * 16
    assert result["tokens_per_sec"] * result["ms_per_iter"] / 1e3 == \
        pytest.approx(4 * 16, rel=1e-2)
    assert 0 < result["mfu"] and result["matmul_peak_gflops"] > 0 and result["peak_rss_mb"] > 10
    assert "tokens/s" in r.stdout


def test_bench_generate_prints_figures_and_json(tmp_path):
    r = minigpt("bench", "generate", "--preset", "tiny", "--prompt-tokens", "6", "--new-tokens", "5",
                "--batch-sizes", "1,3", "--repeats", "2", "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["bench"] == "generate" and result["new_tokens"] == 5
    assert set(result["batch_tokens_per_sec"]) == {"1", "3"}
    assert result["ttft_ms"] > 0 and result["decode_ms_per_token"] > 0 and result["tokens_per_sec"] > 0


def test_bench_rejects_bad_sizes_with_one_line(tmp_path):
    r = minigpt("bench", "generate", "--batch-sizes", "1,x", cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.startswith("minigpt: error: --batch-sizes")
    assert "Traceback" not in r.stderr


def test_busy_cores_counts_what_other_processes_use_now(monkeypatch):
    assert 0 <= cpu.busy_cores(interval=0.01) <= (os.cpu_count() or 1)  # the real /proc/stat
    samples = iter([(1000, 400, 2), (1200, 500, 2)])  # 200 ticks passed on 2 CPUs, 100 of them idle
    monkeypatch.setattr(cpu, "_cpu_times", lambda: next(samples))
    assert cpu.busy_cores(interval=0) == pytest.approx(1.0)
    samples = iter([(1000, 400, 2), (1200, 600, 2)])  # all idle
    monkeypatch.setattr(cpu, "_cpu_times", lambda: next(samples))
    assert cpu.busy_cores(interval=0) == 0.0


def test_auto_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(cpu, "busy_cores", lambda: 0.0)
        assert configure_threads(0) == cores  # an idle machine: every core
        monkeypatch.setattr(cpu, "busy_cores", lambda: float(cores))
        assert configure_threads(0) == 1  # all busy: one thread, never zero
    finally:
        torch.set_num_threads(before)


def test_configure_threads():
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        auto = configure_threads(0)
        assert 1 <= auto <= (os.cpu_count() or 1) and torch.get_num_threads() == auto
    finally:
        torch.set_num_threads(before)
