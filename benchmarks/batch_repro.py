"""How often does batched arithmetic change a token? Requests decoded together in one Batcher vs
each alone through Engine.stream, on a trained run: tokens that differ, streams that differ.

    python benchmarks/batch_repro.py --run-dir runs/bench-serve --requests 32 --max-tokens 64

Every request joins the batch at once (the worst case for rounding: the widest batch, rows at
different positions because their prompts differ in length); half are greedy, half sampled at 0.8
with their own seeds. A stream "differs" from its first differing token on (after one changed
token the rest of the text follows a different context, so later differences are not counted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPTS = ["ROMEO:", "JULIET:\n", "First Citizen:", "KING HENRY:\nMy lord, ", "To be", "O, "]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "bench-serve"))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="batches of --requests, new seeds each")
    args = p.parse_args()

    import torch

    from minigpt import load
    from minigpt.batching import Batcher

    torch.set_num_threads(1)
    engine = load(args.run_dir, device="cpu")
    batcher = Batcher(engine, max_rows=args.requests)
    totals = {"greedy": [0, 0, 0], "sampled": [0, 0, 0]}  # streams, differing streams, tokens
    try:
        for rnd in range(args.rounds):
            specs = [(PROMPTS[i % len(PROMPTS)], 0.0 if i % 2 else 0.8, 7000 + 100 * rnd + i)
                     for i in range(args.requests)]
            reqs = [batcher.submit(pr, max_new_tokens=args.max_tokens, temperature=t, seed=s)
                    for pr, t, s in specs]
            batched = [[e.token for e in r] for r in reqs]
            for (pr, t, s), got in zip(specs, batched):
                alone = [e.token for e in engine.stream(pr, max_new_tokens=args.max_tokens,
                                                        temperature=t, seed=s)]
                kind = totals["greedy" if t == 0 else "sampled"]
                kind[0] += 1
                kind[1] += got != alone
                kind[2] += len(alone)
    finally:
        batcher.close()
    for kind, (streams, differ, tokens) in totals.items():
        print(f"{kind}: {differ} of {streams} streams differ from single-stream "
              f"({tokens} tokens compared)")
    print(json.dumps(totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
