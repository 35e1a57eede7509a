"""Ablation at equal compute: validation loss of recipe variants, each trained for the same time.

    flock /tmp/minigpt-bench.lock python benchmarks/ablate.py --budget 70 --jobs 2

Equal wall time on a machine other people share is measured as equal CPU time on one thread:
1. calibrate: every variant's CPU ms per training step (`minigpt bench train`, one thread, variants
   interleaved, median of rounds), which is what a step costs on an idle core;
2. train each variant for budget / (ms per step) steps, cosine schedule ending there, no
   evaluations on the way (`minigpt train` in a subprocess; several at once with --jobs: the loss a
   run reaches depends on its steps, not on how busy the machine was);
3. score: mean loss over the whole validation split in consecutive block_size windows.
Prints one row per variant and, as the last line, JSON. Results are kept in --out, so an interrupted
ablation resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import minigpt
from minigpt import checkpoint as ckpt
from minigpt.config import PRESETS, RECIPE_MODEL, RECIPE_TRAIN
from minigpt.data.corpus import bundled_corpus
from minigpt.data.dataset import is_prepared, load_prepared
from minigpt.data.prepare import prepare
from minigpt.tools.bench import bench_train
from minigpt.tools.evaluate import split_loss

# nanoGPT's Tiny Shakespeare CPU recipe, in minigpt's GPT-2 layout: the reference every variant
# is compared with.
NANOGPT = dict(arch="gpt2", bias=False, activation="gelu", optimizer="adamw", lr=1e-3, min_lr=1e-4,
               batch_size=12, warmup_iters=100, weight_decay=0.1, beta2=0.99)
# minigpt's default recipe (the small preset), then that recipe with one choice undone or changed.
RECIPE = {**RECIPE_MODEL, **RECIPE_TRAIN, **PRESETS["small"].train}
RECIPE.pop("max_iters")
RECIPE.pop("eval_interval")
VARIANTS: dict[str, dict] = {
    "nanoGPT recipe": NANOGPT,
    "nanoGPT recipe, lr 2e-3": {**NANOGPT, "lr": 2e-3, "min_lr": 2e-4},
    "minigpt recipe": RECIPE,
    "minigpt recipe, seed 2": {**RECIPE, "seed": 2},
    "minigpt recipe, seed 3": {**RECIPE, "seed": 3},
    "- rotary (learned positions)": {**RECIPE, "pos_emb": "learned"},
    "- QK-norm": {**RECIPE, "qk_norm": False},
    "QK-norm before rotary": {**RECIPE, "qk_norm_order": "before_rope"},
    "QK-norm before rotary seed 2": {**RECIPE, "qk_norm_order": "before_rope", "seed": 2},
    "QK-norm after rotary": {**RECIPE, "qk_norm_order": "after_rope"},
    "QK-norm after rotary seed 2": {**RECIPE, "qk_norm_order": "after_rope", "seed": 2},
    "- Muon (AdamW only)": {**RECIPE, "optimizer": "adamw"},
    "- biases": {**RECIPE, "bias": False},
    "- GPT-2 layout (arch gpt2)": {**RECIPE, "arch": "gpt2"},
    "- ReLU^2 (exact GELU)": {**RECIPE, "activation": "gelu"},
    "- ReLU^2 (tanh GELU, GPT-2's)": {**RECIPE, "activation": "gelu_tanh"},
    "+ RMSNorm": {**RECIPE, "norm": "rmsnorm"},
    "+ untied head": {**RECIPE, "tie_embeddings": False},
    "batch 12": {**RECIPE, "batch_size": 12},
    "warmup 100": {**RECIPE, "warmup_iters": 100},
    "Muon lr 0.005": {**RECIPE, "muon_lr": 0.005},
    "Muon lr 0.02": {**RECIPE, "muon_lr": 0.02},
    # the schedule: decay to zero (modded-nanogpt's runs end at lr 0) instead of to lr / 10
    "decay to lr 0": {**RECIPE, "min_lr": 0.0},
    "decay to lr 0, seed 2": {**RECIPE, "min_lr": 0.0, "seed": 2},
    # Qwen3's layout, which llama.cpp and transformers both compute (issue 21): the default's
    # candidate, three seeds against the recipe's three
    "portable layout (arch portable)": {**RECIPE, "arch": "portable"},
    "portable layout seed 2": {**RECIPE, "arch": "portable", "seed": 2},
    "portable layout seed 3": {**RECIPE, "arch": "portable", "seed": 3},
    # StableLM's layout (LayerNorm, per-head LayerNorm QK-norm before rotary, SwiGLU, no biases),
    # which llama.cpp (stablelm) and transformers (StableLmForCausalLM) also both compute
    "stablelm layout (arch stablelm)": {**RECIPE, "arch": "stablelm"},
    "stablelm layout, seed 2": {**RECIPE, "arch": "stablelm", "seed": 2},
    "stablelm layout, seed 3": {**RECIPE, "arch": "stablelm", "seed": 3},
}


def parse_only(text: str) -> list[str]:
    """--only's names, split on commas, keeping the commas that are part of a name
    ("minigpt recipe, seed 2")."""
    parts, names, i = text.split(","), [], 0
    while i < len(parts):
        name, i = parts[i], i + 1
        while i < len(parts) and any(v == name + "," + parts[i] or v.startswith(name + "," + parts[i] + ",")
                                     for v in VARIANTS):
            name, i = name + "," + parts[i], i + 1
        names.append(name)
    return names


# Settings that change what a step learns but not what it costs: variants that differ only in
# these share one calibration and so one step count (measured apart, noise alone gave the same
# step 8% apart, and the comparison would have been of step counts).
COST_NEUTRAL = {"seed", "lr", "min_lr", "muon_lr", "warmup_iters", "weight_decay"}


def cost_key(name: str) -> str:
    """The first variant whose steps cost what `name`'s do (the same but for COST_NEUTRAL
    settings): they share one calibration and one step count."""
    def costly(o: dict) -> dict:
        return {k: v for k, v in o.items() if k not in COST_NEUTRAL}

    return next(n for n, o in VARIANTS.items() if costly(o) == costly(VARIANTS[name]))


def flags(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def calibrate(names: list[str], data: Path, rounds: int, cache: Path) -> dict[str, float]:
    known = json.loads(cache.read_text()) if cache.exists() else {}
    todo = list(dict.fromkeys(cost_key(n) for n in names if cost_key(n) not in known))
    samples: dict[str, list[float]] = {n: [] for n in todo}
    for _ in range(rounds):
        for name in todo:
            r = bench_train(data=str(data), iters=20, warmup=3, threads=1, peak_gflops=1.0,
                            **VARIANTS[name])
            samples[name].append(r["cpu_ms_per_iter"])
    known.update({n: statistics.median(s) for n, s in samples.items()})
    cache.write_text(json.dumps(known, indent=2) + "\n")
    return {n: known[cost_key(n)] for n in names}


def train_variant(name: str, iters: int, data: Path, runs: Path) -> float:
    run = runs / name
    result = run / "ablation.json"
    if result.exists():  # scored before, at this step count (a new calibration may change it)
        kept = json.loads(result.read_text())
        if kept.get("iters") == iters:
            return kept["val_loss"]
    done = [s for s, _ in ckpt.list_checkpoints(run)] if run.exists() else []
    if iters not in done:  # a run finished before an interruption is not trained again
        cmd = [sys.executable, "-m", "minigpt", "train", "--data", str(data), "--out", str(run),
               "--overwrite", "--quiet", "--max-iters", str(iters), "--eval-interval", str(iters),
               "--sample-tokens", "0", "--threads", "1", *flags(VARIANTS[name])]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    engine = minigpt.load(run, checkpoint="last", device="cpu")
    loss = split_loss(engine.model, load_prepared(data).val)
    result.write_text(json.dumps({"val_loss": loss, "iters": iters}) + "\n")
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=70,
                    help="CPU seconds of training per variant (default 70: the small preset's run)")
    ap.add_argument("--only", help="comma-separated variant names (default: all)")
    ap.add_argument("--out", default="runs/ablate", help="where data, runs and results are kept")
    ap.add_argument("--jobs", type=int, default=1, help="variants trained at once")
    ap.add_argument("--rounds", type=int, default=3, help="calibration rounds")
    args = ap.parse_args()
    names = parse_only(args.only) if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s): {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    data = out / "data"
    if not is_prepared(data):
        prepare([bundled_corpus()], data)
    ms = calibrate(names, data, args.rounds, out / "calibration.json")
    runs = out / f"budget-{args.budget:g}"
    iters = {n: max(1, int(args.budget * 1e3 / ms[n])) for n in names}
    with ThreadPoolExecutor(args.jobs) as pool:
        losses = dict(zip(names, pool.map(lambda n: train_variant(n, iters[n], data, runs), names)))
    base = losses.get("minigpt recipe")
    print(f"{'variant':<30} {'CPU ms/step':>11} {'steps':>6} {'val loss':>9} {'vs recipe':>10}")
    for n in names:
        delta = f"{losses[n] - base:+.4f}" if base is not None else ""
        print(f"{n:<30} {ms[n]:11.1f} {iters[n]:6d} {losses[n]:9.4f} {delta:>10}")
    print(json.dumps({"budget_cpu_s": args.budget, "threads": 1, "cpu_count": os.cpu_count(),
                      "variants": {n: {"cpu_ms_per_step": ms[n], "steps": iters[n],
                                       "val_loss": round(losses[n], 4)} for n in names}}))


if __name__ == "__main__":
    main()
