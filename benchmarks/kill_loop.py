"""Kill -9 a training run over and over, resume it each time, and check nothing was lost or corrupted.

    python benchmarks/kill_loop.py [--kills 24] [--seed 0] [--workdir DIR]

1. An uninterrupted reference run trains to --max-iters.
2. The same command is started again in another run directory and killed with SIGKILL again and
   again, each time at one of three kinds of moment, in turn:
     save    - the moment a checkpoint's temporary directory appears: the process dies mid-save;
     random  - a random time (up to 0.3 s) after the run saved a checkpoint since it was restarted;
     early   - a random time since launch, up to the reference run's start-up time (import,
               data, restore) + 0.3 s: mostly during start-up and restore.
   After every kill, every checkpoint on disk is verified (checksums, trainer state loadable with
   weights_only=True), and the run is continued with `minigpt train --out RUN --resume`.
3. Once the kills are done the run is resumed to the end, and its final weights, optimizer state and
   per-step losses are compared with the reference run's, bit for bit.

Every process is a real `python -m minigpt` started by subprocess; there is no test hook in minigpt.
Last line: JSON with kills, resumes, successful resumes, corrupted checkpoints, kills during a save,
and whether the final result equals the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from minigpt import checkpoint as ckpt  # noqa: E402
from minigpt import rundir  # noqa: E402
from minigpt.data.corpus import bundled_corpus  # noqa: E402
from minigpt.errors import CheckpointError  # noqa: E402

TRAIN_ARGS = ("--n-layer 2 --n-head 2 --n-embd 32 --block-size 32 --batch-size 8 --eval-interval 5 "
              "--eval-iters 2 --log-interval 5 --sample-tokens 0 --keep-checkpoints 2 --quiet").split()
# One OpenMP thread per process: on a loaded shared machine spinning OpenMP workers slow tiny runs
# by 10x or more. Both the reference and the killed run use it, so the comparison is like for like.
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def launch(run: Path, corpus: Path, max_iters: int, resume: bool) -> subprocess.Popen:
    argv = [sys.executable, "-m", "minigpt", "train", "--out", str(run)]
    argv += ["--resume"] if resume else ["--data", str(corpus), "--max-iters", str(max_iters), *TRAIN_ARGS]
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _running(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def newest_step(run: Path) -> int:
    ckpts = ckpt.list_checkpoints(run)
    return ckpts[-1][0] if ckpts else 0


def temp_dirs(run: Path, pid: int) -> list[Path]:
    d = ckpt.checkpoints_dir(run)
    return list(d.glob(f".tmp-step-*-{pid}")) if d.is_dir() else []


def wait_for(condition, alive, poll: float = 0.0005, timeout: float = 300.0) -> bool:
    """Poll until condition() holds (True) or alive() turns False (False)."""
    deadline = time.monotonic() + timeout
    while alive():
        if condition():
            return True
        if time.monotonic() > deadline:
            raise TimeoutError("the training process neither progressed nor exited")
        time.sleep(poll)
    return False


def wait_for_kill_moment(mode: str, run: Path, pid: int, alive, start_step: int,
                         rng: random.Random, max_delay: float) -> bool:
    """Wait until the moment `mode` picks; False if the process exited first.

    save:   a temp dir of this process appears, i.e. it is writing a checkpoint right now;
    random: up to max_delay seconds after it saved a checkpoint newer than start_step;
    early:  up to max_delay seconds after launch (start-up, restore, first steps).
    """
    if mode == "save":
        return wait_for(lambda: bool(temp_dirs(run, pid)), alive)
    if mode == "random" and not wait_for(lambda: newest_step(run) > start_step, alive):
        return False
    deadline = time.monotonic() + rng.uniform(0.0, max_delay)
    return wait_for(lambda: time.monotonic() >= deadline, alive)


def corrupted_checkpoints(run: Path) -> list[str]:
    """Every checkpoint with a final name must pass its checksums and load safely."""
    bad = []
    for _, path in ckpt.list_checkpoints(run):
        try:
            ckpt.verify_checkpoint(path)
            ckpt.load_trainer_state(path)
            load_file(str(path / ckpt.WEIGHTS))
        except (CheckpointError, OSError) as e:
            bad.append(str(e))
    return bad


def final_state(run: Path) -> tuple[dict, dict, list]:
    path, meta, _ = ckpt.find_checkpoint(run, "last")
    weights = load_file(str(path / ckpt.WEIGHTS))
    trainer = ckpt.load_trainer_state(path)
    trainer.pop("elapsed")  # wall-clock seconds: the one field that is not a result
    metrics = [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]
    losses = [(m["iter"], m.get("train_loss"), m.get("val_loss")) for m in metrics]
    return weights, trainer, losses


def same_tensors(a, b) -> bool:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=24)
    ap.add_argument("--max-iters", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=None, help="kill-timing seed (default: random)")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="minigpt-kill-"))
    shutil.rmtree(work / "ref", ignore_errors=True)
    shutil.rmtree(work / "killed", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text(bundled_corpus().read_text(encoding="utf-8")[:50_000], encoding="utf-8")

    t0 = time.perf_counter()
    ref = launch(work / "ref", corpus, args.max_iters, resume=False)
    wait_for(lambda: newest_step(work / "ref") > 0, partial(_running, ref))
    startup = time.perf_counter() - t0  # launch to first checkpoint
    _, err = ref.communicate()
    if ref.returncode != 0:
        sys.exit(f"reference run failed: {err}")
    ref_seconds = time.perf_counter() - t0
    print(f"reference run: {args.max_iters} steps in {ref_seconds:.1f}s, first checkpoint after "
          f"{startup:.1f}s (seed for kill times: {seed})")

    run = work / "killed"
    counts = {"kills": 0, "resumes": 0, "resumes_ok": 0, "corrupted_checkpoints": 0,
              "kills_during_save": 0, "kills_before_first_checkpoint": 0}
    modes = ["save", "random", "early"]
    started = False
    while counts["kills"] < args.kills:
        resume = started and (run / rundir.CONFIG).exists()
        start_step = newest_step(run)
        proc = launch(run, corpus, args.max_iters, resume=resume)
        started = True
        counts["resumes"] += counts["kills"] > 0
        mode = modes[counts["kills"] % len(modes)]
        alive = wait_for_kill_moment(mode, run, proc.pid, partial(_running, proc), start_step,
                                     rng, max_delay=startup + 0.3 if mode == "early" else 0.3)
        if alive:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        if proc.returncode == 0:
            sys.exit("the run finished before all kills were done; raise --max-iters")
        if proc.returncode != -signal.SIGKILL:  # it stopped with an error before we killed it
            print(f"launch failed (exit {proc.returncode}): {err.strip()}")
        counts["resumes_ok"] += counts["kills"] > 0 and proc.returncode == -signal.SIGKILL
        counts["kills"] += 1
        during_save = bool(temp_dirs(run, proc.pid))
        counts["kills_during_save"] += during_save
        counts["kills_before_first_checkpoint"] += newest_step(run) == 0
        bad = corrupted_checkpoints(run)
        counts["corrupted_checkpoints"] += len(bad)
        print(f"kill {counts['kills']:2d} ({mode:6s}): newest checkpoint step {newest_step(run):4d}"
              f"{', mid-save' if during_save else ''}{', CORRUPTED: ' + '; '.join(bad) if bad else ''}")

    proc = launch(run, corpus, args.max_iters, resume=True)
    _, err = proc.communicate()
    counts["resumes"] += 1
    counts["resumes_ok"] += proc.returncode == 0
    if proc.returncode != 0:
        print(f"final resume failed (exit {proc.returncode}): {err.strip()}")
        equal = False
    else:
        w_ref, t_ref, l_ref = final_state(work / "ref")
        w_run, t_run, l_run = final_state(run)
        equal = {"weights": same_tensors(w_ref, w_run),
                 "optimizer_and_rng_state": same_tensors(t_ref, t_run),
                 "losses_per_step": l_ref == l_run}
        print(f"final vs uninterrupted run, bit for bit: {equal}")
        equal = all(equal.values())
    print(json.dumps({**counts, "final_equals_uninterrupted": equal, "max_iters": args.max_iters,
                      "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
