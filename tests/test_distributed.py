"""Data-parallel training, started the way users start it: `torchrun --nproc_per_node=2 -m minigpt train`.

Two CPU processes on the gloo backend run the same code a multi-GPU job runs on nccl. Kept tiny: each
torchrun start costs a few seconds of process start-up on a small CI machine.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minigpt
from minigpt import checkpoint as ckpt
from minigpt import rundir
from minigpt.training.distributed import DistContext, dropout_seed

SRC = Path(__file__).resolve().parents[1] / "src"
B = 4  # per-rank batch; the single-process reference uses 2 * B
MODEL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]
# the LR schedule must not depend on max-iters, so an interrupted run and its resume follow it exactly
SCHEDULE = ["--lr", "3e-3", "--min-lr", "3e-4", "--warmup-iters", "2", "--lr-decay-iters", "40",
            "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "0", "--device", "cpu"]


def torchrun(launch: list[str], *args: str) -> list[str]:
    """`torchrun LAUNCH -m minigpt train ARGS` with the torchrun next to this Python (the venv's)."""
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, *launch, "-m", "minigpt", "train", *args]


ONE_NODE = ["--standalone", "--nproc_per_node=2"]


def two_nodes(port: int) -> list[str]:
    """What each of two machines runs (here both on localhost, one process each)."""
    return ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=minigpt-test"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "PYTHONPATH": str(SRC)}


def write_corpus(path: Path) -> Path:
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and runs to the forest for food".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)))
    return path


def metric_lines(run_dir: Path) -> list[dict]:
    path = run_dir / rundir.METRICS
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def train_losses(run_dir: Path) -> list[float]:
    return [m["train_loss"] for m in metric_lines(run_dir)]


def checkpoint_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt.checkpoints_dir(run_dir).iterdir())


def test_two_ranks_interrupt_resume_and_match_one_process_with_twice_the_batch(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "ddp"
    common = [*MODEL, *SCHEDULE, "--batch-size", str(B), "--eval-interval", "100000"]

    # 1. two ranks train on raw text (rank 0 prepares it) until Ctrl-C reaches torchrun
    first = subprocess.Popen(torchrun(ONE_NODE, "--data", str(corpus), "--out", str(run), "--quiet",
                                      "--max-iters", "100000", *common),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while len(metric_lines(run)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out = first.communicate(timeout=120)[0]
    assert "checkpoint saved at step" in out, out
    stopped = int(out.split("checkpoint saved at step ")[1].split(";")[0])
    assert stopped >= 2
    assert out.count("interrupt: finishing this step") == 1  # rank 0 speaks for the job
    # one checkpoint set, written once; one metrics line per step, not one per rank
    assert checkpoint_entries(run) == [ckpt.step_dir_name(stopped)]
    assert [m["iter"] for m in metric_lines(run)] == list(range(1, stopped + 1))
    single = tmp_path / "resumed-alone"
    shutil.copytree(run, single)

    # 2. resume it for 4 more steps as a two-node job: two torchrun agents, one process each
    end = stopped + 4
    launch = torchrun(two_nodes(free_port()), "--out", str(run), "--resume", "--quiet",
                      "--max-iters", str(end))
    nodes = [subprocess.Popen(launch, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert "".join(outs).count(f"step {end}") == 2  # rank 0's eval line and its summary only
    assert checkpoint_entries(run) == [rundir.BEST, ckpt.step_dir_name(stopped), ckpt.step_dir_name(end)]
    assert [m["iter"] for m in metric_lines(run)] == list(range(1, end + 1))

    # 3. the same checkpoint resumes in one process with twice the batch (any world size)
    minigpt.train(out=str(single), resume=True, max_iters=end, batch_size=2 * B, progress=False)

    # 4. reference: one process, batch 2B, from scratch, uninterrupted
    ref = tmp_path / "one-process"
    minigpt.train(data=str(corpus), out=str(ref), max_iters=end, batch_size=2 * B, eval_interval=100000,
                  progress=False, **_as_kwargs([*MODEL, *SCHEDULE]))
    expected = train_losses(ref)
    assert len(expected) == end
    assert train_losses(run) == pytest.approx(expected, abs=2e-4)
    assert train_losses(single) == pytest.approx(expected, abs=2e-4)
    assert expected[-1] < expected[0] - 0.2  # it is a real training curve, not a flat line


def test_an_error_on_rank_0_is_reported_once_and_no_rank_hangs(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / rundir.CONFIG).write_text("{}")
    result = subprocess.run(torchrun(ONE_NODE, "--out", str(taken), "--max-iters", "2", *MODEL, *SCHEDULE),
                            env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if line.startswith("minigpt: error:")]
    assert errors == [f"minigpt: error: {taken} already holds a run; pass --resume to continue it "
                      "or --overwrite to start over"]
    assert (taken / rundir.CONFIG).read_text() == "{}"  # nothing of the user's was touched


def _as_kwargs(flags: list[str]) -> dict:
    """['--lr', '3e-3', ...] -> {'lr': 3e-3, ...}: the flags the torchrun runs got, for train()."""
    out = {}
    for name, value in zip(flags[::2], flags[1::2]):
        key = name.removeprefix("--").replace("-", "_")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def test_dropout_seeds_differ_per_rank_and_step_and_repeat_exactly():
    seeds = {dropout_seed(1337, step, rank) for step in range(50) for rank in range(8)}
    assert len(seeds) == 400
    assert dropout_seed(1337, 7, 1) == dropout_seed(1337, 7, 1)
    assert dropout_seed(-1, 0, 0) != dropout_seed(1, 0, 0)  # any seed the config accepts works


def test_a_single_process_is_rank_0_of_1_with_no_op_collectives():
    ctx = DistContext(torch.device("cpu"))
    assert ctx.is_main and not ctx.distributed
    assert ctx.main_first(lambda: 42) == 42
    with pytest.raises(minigpt.MiniGPTError, match="boom"):
        ctx.main_first(lambda: (_ for _ in ()).throw(minigpt.MiniGPTError("boom")))
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model) is model
    assert ctx.any(True) and not ctx.any(False)
    t = torch.tensor(3.0)
    assert ctx.mean(t) is t
    ctx.barrier()


def _blocks_sigint(tid: int) -> bool:
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError("no SigBlk line")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread signal masks in /proc")
def test_ctrl_c_reaches_the_main_thread_not_the_process_groups_threads(monkeypatch):
    """torchrun forwards Ctrl-C to every rank; landing on a gloo thread it would interrupt a socket
    call there (seen once: both ranks stuck in the gradient all-reduce until torchrun killed them).
    The threads the process group starts block it; the main thread still takes it."""
    import threading

    import torch.distributed as dist

    from minigpt.training import distributed

    # rank 0 of a job, whose group (of one process here, so that no second rank is needed) is
    # opened by session() itself as under torchrun
    real_init = dist.init_process_group
    monkeypatch.setattr(distributed, "torchrun_env", lambda: (0, 0, 2))
    monkeypatch.setattr(distributed, "rank_device", lambda name, local_rank, world: torch.device("cpu"))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: real_init(
        backend, store=dist.HashStore(), rank=0, world_size=1))
    before = set(os.listdir("/proc/self/task"))
    with distributed.session("cpu") as ctx:
        started = set(os.listdir("/proc/self/task")) - before
        assert ctx.waits is not None and started
        assert all(_blocks_sigint(int(t)) for t in started)
        assert not _blocks_sigint(threading.get_native_id())
    assert not dist.is_initialized()
