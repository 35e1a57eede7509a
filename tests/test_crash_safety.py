"""Crash safety: kill -9 at random moments and mid-save, a full disk, an unwritable directory.

The kill test runs the real CLI in child processes (cli_harness) and SIGKILLs them; everything else
calls the library in-process with the failure simulated in the write path (monkeypatch).
benchmarks/kill_loop.py runs the kill loop at scale (>= 20 kills, plain subprocesses).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import pickle
import random
import shlex
import signal
from pathlib import Path

import pytest
import torch

import cli_harness
from minigpt import checkpoint as ckpt
from minigpt import train
from minigpt.data.corpus import bundled_corpus
from minigpt.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
# The kill test shares the benchmark's checks (checkpoint verification, bitwise comparison).
_spec = importlib.util.spec_from_file_location("kill_loop", ROOT / "benchmarks" / "kill_loop.py")
kill_loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_loop)

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2, sample_tokens=0)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(bundled_corpus().read_text(encoding="utf-8")[:5000], encoding="utf-8")
    return path



def _alive(pid: int):
    """Is this fork-server child still running? (It is not our child, so no waitpid.)"""

    def alive() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # Z: exited, not reaped
        except FileNotFoundError:
            return False

    return alive


def _kill_at(argv: list[str], ws: Path, where: str, at: int) -> int:
    """Run the CLI until it stops at the chosen point (cli_harness pause), SIGKILL it; -> its pid."""
    marker = ws / f"paused-{where}-{at}-{os.urandom(4).hex()}"
    pid = cli_harness.spawn(argv, ws, pause={"where": where, "at": at, "marker": str(marker)})
    reached = kill_loop.wait_for(marker.exists, _alive(pid), poll=0.01)
    if not reached:
        raise AssertionError(f"the run ended before its pause point: {cli_harness.wait(pid)}")
    os.kill(pid, signal.SIGKILL)
    assert cli_harness.wait(pid).rc == -signal.SIGKILL
    return pid


def test_kill_9_at_random_moments_and_mid_save_then_resume_equals_the_uninterrupted_run(corpus):
    """Kills land at seeded random steps and inside checkpoint saves. Where each kill lands is
    chosen, not raced: the child stops at its pause point and is killed there, on any machine."""
    ws = corpus.parent
    max_iters = 60
    flags = ("--n-layer 2 --n-head 2 --n-embd 32 --block-size 16 --batch-size 4 --eval-interval 3 "
             f"--eval-iters 1 --log-interval 3 --sample-tokens 0 --max-iters {max_iters} --quiet")
    fresh = lambda out: ["train", "--data", "corpus.txt", "--out", out, *shlex.split(flags)]  # noqa: E731
    assert cli_harness.run(fresh("ref"), ws).rc == 0

    run = ws / "killed"
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    for kills, where in enumerate(["save", "step", "save", "step", "step"]):
        argv = ["train", "--out", "killed", "--resume"] if kills else fresh("killed")
        done = kill_loop.newest_step(run) if kills else 0
        # a step of this process's remaining ones, or one of its next saves (every 3 steps)
        at = rng.randint(1, (max_iters - done) // 2) if where == "step" else rng.randint(1, 3)
        pid = _kill_at(argv, ws, where, at)
        if where == "save":  # killed with half a checkpoint in its temp directory
            assert kill_loop.temp_dirs(run, pid), f"kill {kills + 1} missed the save (seed {seed})"
        assert kill_loop.corrupted_checkpoints(run) == [], f"after kill {kills + 1} (seed {seed})"

    final = cli_harness.run(["train", "--out", "killed", "--resume"], ws)
    assert final.rc == 0, final
    assert not list(ckpt.checkpoints_dir(run).glob(".tmp-*")), "temp dirs of killed saves were not cleared"
    w_ref, t_ref, losses_ref = kill_loop.final_state(ws / "ref")
    w_run, t_run, losses_run = kill_loop.final_state(run)
    # CPU, same thread count, exact resume: bit-for-bit equal, not merely close
    assert kill_loop.same_tensors(w_ref, w_run), f"seed {seed}"
    assert kill_loop.same_tensors(t_ref, t_run), f"seed {seed}"
    assert losses_ref == losses_run, f"seed {seed}"


# --- a failing disk --------------------------------------------------------------------------------


def _fail_in(monkeypatch, where: str, err: int, after_calls: int) -> None:
    """Make the checkpoint write path fail with OSError(err) from its `after_calls`+1-th save on."""
    calls = {"n": 0}

    if where == "torch.save":  # disk full part-way through the trainer state
        real = torch.save

        def fake(obj, f, *a, **k):
            calls["n"] += 1
            if calls["n"] > after_calls:
                Path(f).write_bytes(b"PK\x03\x04 half a file")
                raise OSError(err, os.strerror(err), str(f))
            return real(obj, f, *a, **k)

        monkeypatch.setattr(ckpt.torch, "save", fake)
    else:  # the checkpoints directory became unwritable
        real_mkdir = Path.mkdir

        def fake_mkdir(self, *a, **k):
            if self.name.startswith(".tmp-step-"):
                calls["n"] += 1
                if calls["n"] > after_calls:
                    raise OSError(err, os.strerror(err), str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", fake_mkdir)


@pytest.mark.parametrize("where,err", [("torch.save", errno.ENOSPC), ("mkdir", errno.EACCES)],
                         ids=["disk-full", "unwritable"])
def test_a_failing_save_is_one_clear_error_and_keeps_the_previous_checkpoint(
        corpus, monkeypatch, where, err):
    run = corpus.parent / "run"
    _fail_in(monkeypatch, where, err, after_calls=1)
    with pytest.raises(CheckpointError) as info:
        train(data=str(corpus), out=str(run), max_iters=20, eval_interval=5, progress=False, **TINY)
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot save checkpoint at step 10 in {run / 'checkpoints'}: {os.strerror(err)}" in message
    assert "(checkpoint at step 5 is intact)" in message
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [5]
    ckpt.verify_checkpoint(run / "checkpoints" / "step-0000005")
    assert not list((run / "checkpoints").glob(".tmp-*")), "the half-written checkpoint was left behind"
    monkeypatch.undo()  # the disk has room again: the run continues from step 5
    summary = train(out=str(run), resume=True, progress=False)
    assert summary["step"] == 20


def test_the_cli_prints_a_failing_save_as_one_line(corpus, monkeypatch, capsys):
    from minigpt.cli import main

    _fail_in(monkeypatch, "torch.save", errno.ENOSPC, after_calls=0)
    argv = ["train", "--data", str(corpus), "--out", str(corpus.parent / "run"), "--quiet",
            "--max-iters", "5", "--eval-interval", "5"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("minigpt: error: cannot save checkpoint at step 5")
    assert err[0].endswith("No space left on device (no earlier checkpoint exists)")


# --- loading never runs code -----------------------------------------------------------------------


class Payload:
    """Unpickling this runs `touch TARGET`: a real attack, not a mock."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.target))}",))


@pytest.mark.parametrize("fmt", ["torch.save", "raw-pickle"])
def test_a_malicious_trainer_state_is_refused_and_never_runs(tmp_path, fmt):
    target = tmp_path / "pwned"
    step_dir = tmp_path / "step"
    step_dir.mkdir()
    if fmt == "torch.save":
        torch.save({"optimizer": Payload(target)}, step_dir / ckpt.TRAINER)
    else:
        (step_dir / ckpt.TRAINER).write_bytes(pickle.dumps({"optimizer": Payload(target)}))
    with pytest.raises(CheckpointError) as info:
        ckpt.load_trainer_state(step_dir)
    assert not target.exists(), "the payload ran"
    message = str(info.value)
    assert message.startswith(f"refusing to load {step_dir / ckpt.TRAINER}: it is not plain tensor data")
    assert "\n" not in message and "weights_only" not in message  # never suggest the unsafe way
    # the control: the same file loaded the unsafe way runs the payload (a raw pickle then fails
    # torch's magic-number check, after the damage is done)
    with contextlib.suppress(RuntimeError):
        torch.load(step_dir / ckpt.TRAINER, weights_only=False)
    assert target.exists()
