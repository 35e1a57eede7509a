"""What one decode step of a run costs, and which part of it: the figures behind "Against llama.cpp's
llama-server" in docs/server.md.

    python benchmarks/decode_step.py [--run RUN] [--rows 1,8,32] [--threads 1] [--compile]

For each batch size B (rows at their own positions, as `minigpt serve` decodes them) it times
`GPT.forward` of one token per row against a KV cache of the server's 32 rows, then the same
forward with attention replaced by returning the queries (what attention costs in place), and one
`scaled_dot_product_attention` call alone: hot (the same keys and values again, in L2) and cold
(cycling through caches bigger than L2, as the forward meets them). `--compile` also times
the compiled one-row step of `minigpt serve --compile` (compiled.py: inductor, cpp_wrapper on a
CPU, one graph for every position) on a cache of 1 row and on one of 32. Without --run:
runs/bench-serve-default (as benchmarks/serve_vs_llama.py makes it). Microseconds per call, the
best of 5 rounds in which the variants take turns. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def interleaved(fns: dict, n: int, repeats: int = 5) -> dict:
    """Microseconds per call of each function: the best of `repeats` rounds of n calls, the
    functions taking turns within each round, so that a noisy neighbour slows them alike."""
    for fn in fns.values():
        for _ in range(max(5, n // 10)):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e6)
    return {name: round(us, 1) for name, us in best.items()}


class _NoAttention:
    """Stands in for torch.nn.functional inside minigpt.model: attention returns its queries."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(q, k, v, **_):
        return q.clone()


def attention_call(cfg, B: int, length: int, caches: int):
    """One decode attention call over `length` positions of B rows, cycling through `caches` KV
    caches of the server's shape (one: hot in cache; several: each call meets cold memory)."""
    shape = (32, cfg.n_head, cfg.block_size, cfg.head_dim)
    ks = [torch.randn(shape).narrow(0, 0, B).narrow(2, 0, length) for _ in range(caches)]
    vs = [torch.randn(shape).narrow(0, 0, B).narrow(2, 0, length) for _ in range(caches)]
    q = torch.randn(B, cfg.n_head, 1, cfg.head_dim)
    mask = (torch.arange(length) <= torch.randint(length // 2, length, (B,)).view(B, 1))
    mask = mask.view(B, 1, 1, length)
    i = [0]

    def call():
        j = i[0] = (i[0] + 1) % caches
        F.scaled_dot_product_attention(q, ks[j], vs[j], attn_mask=mask)

    return call


class _Swapped:
    """`forward` with minigpt.model's torch.nn.functional swapped for `_NoAttention`."""

    def __init__(self, module, fn):
        self.module, self.fn = module, fn

    def __call__(self):
        self.module.F = _NoAttention()
        try:
            self.fn()
        finally:
            self.module.F = F


def compiled_step(model, rows: int):
    """`minigpt serve --compile`'s step (compiled.py) on a cache of `rows` rows -> (compile
    seconds, the step at one position)."""
    from minigpt.compiled import one_row_step
    from minigpt.kv_cache import KVCache

    step, seconds = one_row_step(model, KVCache.for_model(model, rows))
    return round(seconds, 1), lambda: step(1, 30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench-serve-default"))
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import minigpt.model as model_module
    from minigpt.engine import load
    from minigpt.kv_cache import KVCache

    model = load(args.run, device="cpu").model
    cfg = model.config
    length = min(50, cfg.block_size)
    out: dict = {"bench": "decode_step", "run": args.run, "threads": args.threads, "rows": {}}
    with torch.inference_mode():
        cache = KVCache.for_model(model, 32)
        for B in (int(b) for b in args.rows.split(",")):
            idx = torch.randint(0, cfg.vocab_size, (B, 1))
            # rows at their own positions, the longest at `length`; one row: one position
            pos = length - 1 if B == 1 else [length - 1 - (r % (length // 2)) for r in range(B)]
            forward = lambda idx=idx, pos=pos: model(idx, cache=cache, pos=pos)  # noqa: E731
            fns = {"forward_us": forward,
                   "without_attention_us": _Swapped(model_module, forward),
                   "attention_hot_us": attention_call(cfg, B, length, 1),
                   "attention_cold_us": attention_call(cfg, B, length, 16)}
            if args.compile and B == 1:
                for rows in (1, 32):
                    seconds, fns[f"compiled_cache{rows}_us"] = compiled_step(model, rows)
                    out[f"compile_cache{rows}_s"] = seconds
            r = out["rows"][B] = interleaved(fns, args.steps)
            print(f"B={B:>2}  " + "  ".join(f"{k[:-3]} {v:.1f} us" for k, v in r.items()),
                  flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
