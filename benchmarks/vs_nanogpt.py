"""minigpt beside nanoGPT on this machine, interleaved in one run: training speed at the identical
configuration, time to a validation loss, and generation speed. Prints ratios; last line JSON.

nanoGPT is run as an external program from a checkout you provide; nothing of it is copied here:

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt
    flock /tmp/minigpt-bench.lock python benchmarks/vs_nanogpt.py --nanogpt /tmp/nanogpt

Its data is prepared by its own `data/shakespeare_char/prepare.py` from our bundled Tiny Shakespeare
(copied to its input.txt first, so nothing is downloaded; `requests`, which that script imports for
the download, is stood in for by an empty module). The configuration is nanoGPT's CPU recipe from its
README: 4 layers, 4 heads, 128 dims, context 64, batch 12, dropout 0, no biases (0.80M parameters).

Parts (--parts, comma-separated):
  speed     ms per training iteration, both tools as shipped (their own thread choice) and both on
            one thread; on one thread also CPU ms per iteration, which is what an iteration costs on
            an idle core however busy the machine is.
  loss      nanoGPT's full recipe (2000 iterations, its evaluations) against minigpt's default
            recipe and --long-iters recipe: wall time, CPU time, and validation loss both as each
            tool reports it and recomputed the same way for both (whole validation split).
  generate  50 and 500 new tokens from a one-token prompt, one stream, both on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import minigpt
from minigpt.config import ModelConfig
from minigpt.data.corpus import bundled_corpus
from minigpt.data.dataset import load_prepared
from minigpt.model import GPT
from minigpt.tools.evaluate import split_loss

CONFIG = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
NANO_FLAGS = ["--device=cpu", "--compile=False", "--block_size=64", "--batch_size=12", "--n_layer=4",
              "--n_head=4", "--n_embd=128", "--dropout=0.0", "--lr_decay_iters=2000"]
# minigpt's GPT-2 layout with nanoGPT's choices: no biases, exact GELU, AdamW at 1e-3, batch 12
SAME_MODEL = ["--arch", "gpt2", "--no-bias", "--activation", "gelu", "--n-layer", "4", "--n-head", "4",
              "--n-embd", "128", "--block-size", "64"]
SAME_RECIPE = [*SAME_MODEL, "--optimizer", "adamw", "--lr", "1e-3", "--min-lr", "1e-4",
               "--batch-size", "12", "--warmup-iters", "100", "--beta2", "0.99", "--weight-decay", "0.1"]

# Times nanoGPT's own GPT.generate (its public API) on a fresh model of the same configuration.
NANO_GENERATE = """
import statistics, sys, time, torch
from model import GPT, GPTConfig
new, repeats = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False, vocab_size=65,
                      dropout=0.0)).eval()
idx = torch.zeros((1, 1), dtype=torch.long)
with torch.no_grad():
    model.generate(idx, 5, temperature=0.8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(idx, new, temperature=0.8)
        times.append(time.perf_counter() - t0)
print(statistics.median(times))
"""


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[str, float, float]:
    """(stdout, wall seconds, CPU seconds) of a command that must succeed; its peak RSS in MB is
    kept in run.peak_rss_mb."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out,
                             stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own CPU time and peak memory
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"command failed: {' '.join(cmd)}\n{err.read()[-3000:]}")
        run.peak_rss_mb = usage.ru_maxrss / 1024
        return out.read(), wall, usage.ru_utime + usage.ru_stime


def threads_env(threads: int) -> dict:
    """nanoGPT has no thread setting; OMP_NUM_THREADS is how torch is told from outside."""
    return {"OMP_NUM_THREADS": str(threads)} if threads else {}


def minigpt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "minigpt", *args]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def prepare_nanogpt(nano: Path) -> None:
    data = nano / "data" / "shakespeare_char"
    if not (nano / "train.py").exists() or not (data / "prepare.py").exists():
        sys.exit(f"{nano} is not a nanoGPT checkout (train.py, data/shakespeare_char/prepare.py)")
    if (data / "val.bin").exists() and (data / "meta.pkl").exists():
        return
    shutil.copy(bundled_corpus(), data / "input.txt")
    with tempfile.TemporaryDirectory() as stub:
        Path(stub, "requests.py").write_text("# input.txt exists: prepare.py downloads nothing\n")
        run([sys.executable, "prepare.py"], cwd=data, env={"PYTHONPATH": stub})


def nano_train(nano: Path, out: Path, iters: int, threads: int, evals: bool) -> tuple[str, float, float]:
    extra = (["--eval_iters=20", f"--eval_interval={min(250, max(1, iters // 2))}"] if evals else
             ["--eval_iters=1", "--eval_interval=1000000"])
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANO_FLAGS, *extra,
           "--log_interval=1", f"--max_iters={iters}", f"--out_dir={out}"]
    return run(cmd, cwd=nano, env=threads_env(threads))


def nano_iter_ms(stdout: str, skip: int = 5) -> float:
    times = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", stdout)
             if int(it) >= skip]
    return statistics.median(times)


def part_speed(nano: Path, tmp: Path, rounds: int, iters: int) -> dict:
    rows: dict[str, dict[str, list[float]]] = {"as_shipped": {}, "one_thread": {}}
    for _ in range(rounds):
        for label, threads in (("as_shipped", 0), ("one_thread", 1)):
            r = rows[label]
            out, _, cpu_n = nano_train(nano, tmp / "nano-speed", iters, threads, evals=False)
            r.setdefault("nanogpt_ms", []).append(nano_iter_ms(out))
            if threads == 1:  # CPU per iteration: the difference to a one-iteration run
                _, _, cpu_1 = nano_train(nano, tmp / "nano-speed", 1, threads, evals=False)
                r.setdefault("nanogpt_cpu_ms", []).append((cpu_n - cpu_1) / (iters - 1) * 1e3)
            out, _, _ = run(minigpt_cmd("bench", "train", *SAME_RECIPE, "--iters", str(iters - 5),
                                        "--warmup", "5", "--threads", str(threads)))
            res = last_json(out)
            r.setdefault("minigpt_ms", []).append(res["ms_per_iter"])
            r.setdefault("minigpt_threads", []).append(res["threads"])
            if threads == 1:
                r.setdefault("minigpt_cpu_ms", []).append(res["cpu_ms_per_iter"])
    result = {}
    for label, r in rows.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        med["speedup_wall"] = round(med["nanogpt_ms"] / med["minigpt_ms"], 2)
        if "nanogpt_cpu_ms" in med:
            med["speedup_cpu"] = round(med["nanogpt_cpu_ms"] / med["minigpt_cpu_ms"], 2)
        med["tokens_per_sec_minigpt"] = round(12 * 64 / med["minigpt_ms"] * 1e3)
        med["tokens_per_sec_nanogpt"] = round(12 * 64 / med["nanogpt_ms"] * 1e3)
        result[label] = {k: round(v, 2) if isinstance(v, float) else v for k, v in med.items()}
    return result


def nano_checkpoint_loss(nano: Path, out: Path) -> float:
    """nanoGPT's best checkpoint, loaded into minigpt's GPT-2 layout (same parameter names), scored
    on nanoGPT's own validation tokens the way minigpt scores its runs."""
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("_orig_mod.").removeprefix("transformer."): v
             for k, v in ckpt["model"].items()}
    model = GPT(ModelConfig(**CONFIG, vocab_size=state["wte.weight"].shape[0], arch="gpt2",
                            bias=False, activation="gelu"))
    model.load_state_dict(state)
    val = np.memmap(nano / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16, mode="r")
    return split_loss(model, val)


def part_loss(nano: Path, tmp: Path, rounds: int, threads: int, long_iters: int,
              nano_iters: int = 2000) -> dict:
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        out, wall, cpu = nano_train(nano, tmp / "nano-loss", nano_iters, threads, evals=True)
        reported = float(re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", out)[-1])
        runs.setdefault("nanogpt", []).append({
            "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": run.peak_rss_mb, "val_loss_reported": reported,
            "val_loss_full_split": nano_checkpoint_loss(nano, tmp / "nano-loss")})
        for label, extra in (("minigpt_default", []),
                             ("minigpt_long", ["--max-iters", str(long_iters)])):
            if label == "minigpt_long" and not long_iters:
                continue
            run_dir = tmp / label
            _, wall, cpu = run(minigpt_cmd("train", "--out", str(run_dir), "--overwrite", "--quiet",
                                           "--threads", str(threads), *extra))
            rss = run.peak_rss_mb
            info = json.loads(run(minigpt_cmd("info", str(run_dir), "--json"))[0])
            engine = minigpt.load(run_dir, device="cpu")
            runs.setdefault(label, []).append({
                "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss, "val_loss_reported": info["best_val_loss"],
                "val_loss_full_split": split_loss(engine.model, load_prepared(run_dir / "data").val),
                "steps": info["step"]})
    result = {}
    for label, rs in runs.items():
        result[label] = {k: round(statistics.median(r[k] for r in rs), 4) for k in rs[0]}
    nano_wall, nano_cpu = result["nanogpt"]["wall_s"], result["nanogpt"]["cpu_s"]
    for label in result:
        result[label]["wall_vs_nanogpt"] = round(result[label]["wall_s"] / nano_wall, 3)
        result[label]["cpu_vs_nanogpt"] = round(result[label]["cpu_s"] / nano_cpu, 3)
    return result


def part_generate(nano: Path, rounds: int) -> dict:
    out: dict[str, list[float]] = {}
    for _ in range(rounds):
        for new in (50, 500):
            s, _, _ = run([sys.executable, "-c", NANO_GENERATE, str(new), "3"], cwd=nano,
                          env=threads_env(1))
            seconds = float(s.strip().splitlines()[-1])  # nanoGPT prints its parameter count first
            out.setdefault(f"nanogpt_tok_s_{new}", []).append(new / seconds)
            res = last_json(run(minigpt_cmd("bench", "generate", *SAME_MODEL, "--new-tokens", str(new),
                                            "--batch-sizes", "1,32", "--repeats", "3",
                                            "--threads", "1"))[0])
            out.setdefault(f"minigpt_tok_s_{new}", []).append(res["tokens_per_sec"])
            if new == 50:
                out.setdefault("minigpt_ttft_ms_64", []).append(res["ttft_ms"])
                out.setdefault("minigpt_batch32_tok_s", []).append(res["batch_tokens_per_sec"]["32"])
    result = {k: round(statistics.median(v), 1) for k, v in out.items()}
    for new in (50, 500):
        result[f"speedup_{new}"] = round(result[f"minigpt_tok_s_{new}"] / result[f"nanogpt_tok_s_{new}"], 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", required=True, type=Path, help="path of a nanoGPT checkout")
    ap.add_argument("--parts", default="speed,generate,loss")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats of speed and generate")
    ap.add_argument("--loss-rounds", type=int, default=1, help="interleaved repeats of the loss part")
    ap.add_argument("--loss-threads", type=int, default=1,
                    help="threads for both tools in the loss part (0 = each tool's own choice)")
    ap.add_argument("--long-iters", type=int, default=0,
                    help="also train minigpt's default recipe for this many iterations (0 = skip)")
    ap.add_argument("--iters", type=int, default=60, help="training iterations per speed sample")
    args = ap.parse_args()
    nano = args.nanogpt.resolve()
    prepare_nanogpt(nano)
    parts = args.parts.split(",")
    result: dict = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="vs-nanogpt-") as tmp:
        tmp = Path(tmp)
        if "speed" in parts:
            result["speed"] = part_speed(nano, tmp, args.rounds, args.iters)
            print("training speed (ms/iteration, median):", json.dumps(result["speed"]), flush=True)
        if "generate" in parts:
            result["generate"] = part_generate(nano, args.rounds)
            print("generation (tokens/s, median):", json.dumps(result["generate"]), flush=True)
        if "loss" in parts:
            result["loss"] = part_loss(nano, tmp, args.loss_rounds, args.loss_threads, args.long_iters)
            print("time to loss:", json.dumps(result["loss"]), flush=True)
    result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
