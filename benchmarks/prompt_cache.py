"""Prompt caching: time to the first token of a request whose prompt shares a 900-token prefix with
the previous request's, against the first request's, on a model with a 1024-token context.

    python benchmarks/prompt_cache.py [--shared 900] [--new 60] [--repeats 5]

A `small` preset model with block_size 1024 and random weights (prefill cost does not depend on
training), the Tiny Shakespeare characters. Each repeat is a fresh Batcher with the server's
prompt cache (8 entries) stepped in the main thread, as `minigpt serve` decodes: request one (the
shared prefix + `new` tokens) then request two (the same prefix + `new` other tokens); a batcher
without the cache decodes request two too, and the two must give the same tokens. Last line: JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from minigpt.batching import Batcher
from minigpt.config import ServeConfig, resolve
from minigpt.data.corpus import bundled_corpus
from minigpt.engine import Engine
from minigpt.model import GPT
from minigpt.tokenization import CharTokenizer


def first_token(batcher: Batcher, prompt: list[int]) -> tuple[float, list[int]]:
    """Seconds from submit to the first token, and the request's 16 greedy tokens."""
    start = time.perf_counter()
    req = batcher.submit(prompt, max_new_tokens=16, temperature=0, stop_at_eos=False)
    ttft = None
    tokens: list[int] = []
    while not req.done:
        batcher.step()
        events, _ = req.drain()
        tokens += [e.token for e in events if e.token is not None]
        if ttft is None and tokens:
            ttft = time.perf_counter() - start
    tokens += [e.token for e in req.drain()[0] if e.token is not None]
    return ttft, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=int, default=900)
    ap.add_argument("--new", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    text = bundled_corpus().read_text(encoding="utf-8")
    tok = CharTokenizer.train([text])
    torch.manual_seed(0)
    config = dataclasses.replace(resolve("small")[0], vocab_size=tok.vocab_size, block_size=1024)
    engine = Engine(GPT(config), tok)
    ids = tok.encode(text)
    shared = ids[: args.shared]
    one = shared + ids[args.shared : args.shared + args.new]
    two = shared + ids[-args.new :]
    firsts, seconds, same = [], [], True
    for _ in range(args.repeats + 1):  # the first round warms allocations up and is not counted
        cached = Batcher(engine, max_rows=4, start=False, prompt_cache=ServeConfig.prompt_cache)
        t1, _ = first_token(cached, one)
        t2, got = first_token(cached, two)
        _, want = first_token(Batcher(engine, max_rows=4, start=False), two)
        same &= got == want
        firsts.append(t1)
        seconds.append(t2)
    t1, t2 = statistics.median(firsts[1:]), statistics.median(seconds[1:])
    print(f"first request  TTFT {t1 * 1000:8.1f} ms ({len(one)} prompt tokens)")
    print(f"second request TTFT {t2 * 1000:8.1f} ms ({args.shared} shared)  ratio {t2 / t1:.2f}")
    print(json.dumps({"bench": "prompt_cache", "torch_threads": torch.get_num_threads(),
                      "context": 1024, "shared": args.shared, "new": args.new,
                      "ttft_first_ms": round(t1 * 1000, 1), "ttft_second_ms": round(t2 * 1000, 1),
                      "ratio": round(t2 / t1, 3), "same_tokens": same}))


if __name__ == "__main__":
    main()
