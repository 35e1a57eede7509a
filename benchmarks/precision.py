"""Training throughput per compute dtype (and with --compile) on this machine's device, side by side.

    python benchmarks/precision.py --preset small --steps 30            # CPU: float32 vs bf16 vs fp16
    python benchmarks/precision.py --preset large --device cuda --compile

Each configuration trains the preset for 2 x `steps` optimizer steps through `minigpt.train` (the real
loop: autocast, GradScaler, fused AdamW); the first `steps` are warm-up (and compilation), the
throughput of the second `steps` is reported. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import minigpt
from minigpt.device import resolve_device


def tokens_per_sec(preset: str, device: str, dtype: str, steps: int, compile: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        minigpt.train(preset=preset, out=str(Path(tmp) / "run"), device=device, dtype=dtype,
                      compile=compile, max_iters=2 * steps, log_interval=steps,
                      eval_interval=10**9, eval_iters=1, sample_tokens=0, progress=False)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[1])["tokens_per_sec"]  # the second window: after warm-up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--compile", action="store_true", help="also measure each dtype compiled")
    args = ap.parse_args()
    device = str(resolve_device(args.device))
    results = {}
    for dtype in args.dtypes.split(","):
        for compiled in (False, True) if args.compile else (False,):
            name = dtype + ("+compile" if compiled else "")
            results[name] = tokens_per_sec(args.preset, device, dtype, args.steps, compiled)
            print(f"{name:<18} {results[name]:>12,.0f} tok/s", file=sys.stderr)
    base = results.get("float32")
    if base:
        for name, v in results.items():
            print(f"{name:<18} {v / base:>6.2f}x float32", file=sys.stderr)
    print(json.dumps({"preset": args.preset, "device": device, "steps": args.steps,
                      "tokens_per_sec": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
