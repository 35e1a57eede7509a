"""LoRA against full fine-tuning: step time and memory, and the loss each reaches at equal steps.

    python benchmarks/lora.py                       # both parts
    python benchmarks/lora.py --skip-loss           # speed and memory only
    python benchmarks/lora.py --skip-loss --skip-speed --gpt2-size   # a GPT-2-124M-sized model

1. speed and memory: `minigpt bench train` of the largest preset (or --preset) for a few steps, full
   fine-tuning (AdamW on every weight) against LoRA (--lora-rank, AdamW on the adapters), each in
   its own process so that its peak RSS is its own; also the training state each keeps (weights +
   gradients + AdamW moments, computed: float32). Weights do not change the cost of a step, so both
   time a fresh model.
2. loss at equal steps: a base run (`small`) on the first 90% of Tiny Shakespeare; then, on the last
   10% (other plays; its own held-out last tenth is the validation text), the same number of steps
   of: LoRA from the base, full fine-tuning from the base, and training from scratch. The val loss
   at every evaluation of each is printed, and all of it as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import minigpt
from minigpt import rundir
from minigpt.config import PRESETS
from minigpt.data.corpus import bundled_corpus

SRC = Path(__file__).resolve().parents[1] / "src"


# GPT-2 124M's blocks (12 x 768, 12 heads) at a 256-token context, on the benchmark's character
# vocabulary: its 85M non-embedding parameters are GPT-2's; its embeddings are 67 rows, not 50,257
GPT2_SIZE = ["--n-layer", "12", "--n-head", "12", "--n-embd", "768", "--block-size", "256"]


def bench(preset: str, batch: int, iters: int, extra: list[str]) -> dict:
    """`minigpt bench train` in a fresh process; its JSON line."""
    cmd = [sys.executable, "-m", "minigpt", "bench", "train", "--preset", preset, "--optimizer",
           "adamw", "--batch-size", str(batch), "--iters", str(iters), "--warmup", "1",
           "--dropout", "0", *extra]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def training_state_mb(params: int, trainable: int) -> float:
    """float32 weights of every parameter, gradients and two AdamW moments of the trained ones."""
    return (params + 3 * trainable) * 4 / 2**20


def speed(preset: str, batch: int, iters: int, rank: int, model: list[str]) -> dict:
    rows = {}
    for name, extra in (("full", []), ("lora", ["--lora-rank", str(rank)])):
        r = bench(preset, batch, iters, [*model, *extra])
        rows[name] = {k: r[k] for k in ("params", "trainable_params", "ms_per_iter",
                                        "cpu_ms_per_iter", "tokens_per_iter", "peak_rss_mb",
                                        "threads", "device")}
        rows[name]["training_state_mb"] = round(training_state_mb(r["params"],
                                                                  r["trainable_params"]), 1)
        label = "gpt2-124m-sized" if model else preset
        print(f"{label} {name:>4}: {r['trainable_params']:>10,} trained of {r['params']:,}; "
              f"{r['ms_per_iter']:8.1f} ms/step (CPU {r['cpu_ms_per_iter']:.1f}), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, training state {rows[name]['training_state_mb']} MB")
    return rows


def val_curve(run: Path) -> dict[int, float]:
    return {r["iter"]: r["val_loss"] for r in rundir.read_metrics(run)
            if r.get("val_loss") is not None}


def losses(root: Path, base_steps: int, steps: int, every: int, rank: int,
           lora_lrs: list[float]) -> dict:
    text = bundled_corpus().read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    (root / "base.txt").write_text(text[:cut], encoding="utf-8")
    (root / "new.txt").write_text(text[cut:], encoding="utf-8")
    quiet = dict(progress=False, sample_tokens=0)
    minigpt.train(preset="small", data=str(root / "base.txt"), out=str(root / "base"),
                  max_iters=base_steps, eval_interval=base_steps, **quiet)
    common = dict(data=str(root / "new.txt"), max_iters=steps, eval_interval=every, **quiet)
    runs = {  # each LoRA learning rate with min-lr a tenth of it, as the fine-tuning defaults
        **{f"lora lr {lr:g}": dict(init_from=str(root / "base"), lora_rank=rank, lr=lr,
                                   min_lr=lr / 10) for lr in lora_lrs},
        "full": dict(init_from=str(root / "base")),  # the fine-tuning defaults
        "scratch": dict(preset="small"),  # the small preset's recipe
    }
    curves = {}
    for name, settings in runs.items():
        run = root / name.replace(" ", "-")
        minigpt.train(out=str(run), **common, **settings)
        curves[name] = val_curve(run)
    print(f"{'val loss on new.txt':<20}" + "".join(f"{s:>9}" for s in curves["full"]))
    for name, curve in curves.items():
        print(f"{name:<20}" + "".join(f"{curve.get(s, float('nan')):>9.4f}" for s in curves["full"]))
    lora_cfg = rundir.read_config(root / f"lora-lr-{lora_lrs[0]:g}")[0]
    return {"base_steps": base_steps, "steps": steps, "rank": rank, "lora_lrs": lora_lrs,
            "lora_alpha": lora_cfg.lora_alpha, "targets": list(lora_cfg.lora_targets),
            "val_loss": {k: {str(s): round(v, 4) for s, v in c.items()}
                         for k, c in curves.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=list(PRESETS)[-1], help="model of the speed part (default: "
                   "the largest preset)")
    p.add_argument("--batch-size", type=int, default=8, help="speed part: sequences per step")
    p.add_argument("--iters", type=int, default=3, help="speed part: timed steps")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--lora-lr", type=float, nargs="+", default=[3e-3],
                   help="LoRA learning rates to compare (one run each)")
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--gpt2-size", action="store_true", help="also time a GPT-2-124M-sized model "
                   "(12 x 768, context 256, batch 1)")
    args = p.parse_args()
    result: dict = {"bench": "lora"}
    if not args.skip_speed:
        result["speed"] = {"preset": args.preset, "batch_size": args.batch_size,
                           **speed(args.preset, args.batch_size, args.iters, args.rank, [])}
    if args.gpt2_size:
        result["speed_gpt2_size"] = {"batch_size": 1, "block_size": 256, **speed(
            args.preset, 1, args.iters, args.rank, GPT2_SIZE)}
    if not args.skip_loss:
        with tempfile.TemporaryDirectory(prefix="minigpt-lora-") as tmp:
            result["loss"] = losses(Path(tmp), args.base_steps, args.steps, args.eval_interval,
                                    args.rank, args.lora_lr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
