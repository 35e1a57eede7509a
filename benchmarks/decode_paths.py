"""Where decoding runs: one stream, and 32 separate requests decoded the way the server decodes
them (the main thread, HTTP from a second one), against the same requests stepped by hand in the
main thread and decoded by a batcher thread of their own.

    python benchmarks/decode_paths.py [RUN] [--requests 32] [--tokens 56] [--repeats 5]

Without RUN, a `small` preset model with random weights and the Tiny Shakespeare characters (speed
does not depend on training). All in one process, alternating, median of the repeats:
- one_stream: `Engine.generate`, one request;
- manual_main: a thread-less Batcher stepped in the main thread, every request submitted at once;
- server_main: what `minigpt serve` runs: the batcher's loop (`Batcher.run`) in the main thread,
  the thread that loaded the model and owns torch's pool; requests submitted and read from a
  second thread as the HTTP thread reads them (woken by `notify`, draining every request, at most
  every 5 ms);
- server_thread: the same requests decoded by the Batcher's own thread (with its default torch
  threads: one fewer than the pool), read from the main thread (`create_app` used on its own);
- server_thread_full_pool: the same with the thread given torch's whole pool, the setting that
  makes a second OpenMP pool compete with the loading thread's (the loss this benchmark guards).
Last line: JSON with tokens/s of each and the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import threading
import time

import torch

import minigpt
from minigpt.batching import Batcher
from minigpt.config import resolve
from minigpt.data.corpus import bundled_corpus
from minigpt.engine import Engine
from minigpt.model import GPT
from minigpt.tokenization import CharTokenizer

STREAM_INTERVAL = 0.005  # the server's default: serve/jobs.py


def engine_for(run: str | None) -> Engine:
    if run:
        return minigpt.load(run)
    tok = CharTokenizer.train([bundled_corpus().read_text(encoding="utf-8")])
    torch.manual_seed(0)
    return Engine(GPT(dataclasses.replace(resolve("small")[0], vocab_size=tok.vocab_size)), tok)


def submit_all(batcher: Batcher, n: int, tokens: int) -> list:
    return [batcher.submit("ROMEO:", max_new_tokens=tokens, seed=i, stop_at_eos=False)
            for i in range(n)]


def manual_main(engine: Engine, n: int, tokens: int) -> float:
    batcher = Batcher(engine, max_rows=n, start=False)
    start = time.perf_counter()
    reqs = submit_all(batcher, n, tokens)
    while not all(r.done for r in reqs):
        batcher.step()
    return n * tokens / (time.perf_counter() - start)


def read_as_server(batcher: Batcher, n: int, tokens: int) -> None:
    """Submit every request and read as the server reads: a notify wakes the reader, which drains
    every request and then waits out the stream interval (serve/jobs.py) before the next take."""
    woken = threading.Event()
    reqs = [batcher.submit("ROMEO:", max_new_tokens=tokens, seed=i, stop_at_eos=False,
                           notify=woken.set) for i in range(n)]
    open_reqs = set(reqs)
    while open_reqs:
        woken.wait()
        woken.clear()
        for req in list(open_reqs):
            if req.drain()[1]:
                open_reqs.discard(req)
        time.sleep(STREAM_INTERVAL)


def server_thread(engine: Engine, n: int, tokens: int, threads: int | None) -> float:
    """The batcher in its own thread, read from the main thread (`create_app` on its own)."""
    batcher = Batcher(engine, max_rows=n, threads=threads)
    start = time.perf_counter()
    read_as_server(batcher, n, tokens)
    elapsed = time.perf_counter() - start
    batcher.close()
    return n * tokens / elapsed


def server_main(engine: Engine, n: int, tokens: int) -> float:
    """`minigpt serve`: the batcher runs in the main thread, requests come from another."""
    batcher = Batcher(engine, max_rows=n, start=False)

    def client() -> None:
        read_as_server(batcher, n, tokens)
        batcher.close()

    reader = threading.Thread(target=client)
    start = time.perf_counter()
    reader.start()
    batcher.run()
    elapsed = time.perf_counter() - start
    reader.join()
    return n * tokens / elapsed


def one_stream(engine: Engine, tokens: int) -> float:
    start = time.perf_counter()
    engine.generate("ROMEO:", max_new_tokens=tokens, seed=0, stop_at_eos=False)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=56)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    engine = engine_for(args.run)
    pool = torch.get_num_threads()
    cases = {
        "one_stream": lambda: one_stream(engine, args.tokens),
        "manual_main": lambda: manual_main(engine, args.requests, args.tokens),
        "server_main": lambda: server_main(engine, args.requests, args.tokens),
        "server_thread": lambda: server_thread(engine, args.requests, args.tokens, None),
        "server_thread_full_pool": lambda: server_thread(engine, args.requests, args.tokens, pool),
    }
    for case in cases.values():  # warm-up: allocations, dispatch caches, the batcher threads
        case()
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():
            runs[name].append(case())
    tps = {name: round(statistics.median(v)) for name, v in runs.items()}
    for name, v in tps.items():
        print(f"{name:26s} {v:8,d} tokens/s")
    print(json.dumps({
        "bench": "decode_paths", "torch_threads": pool, "requests": args.requests,
        "tokens": args.tokens, "tokens_per_sec": tps,
        "server_main_vs_one_stream": round(tps["server_main"] / tps["one_stream"], 2),
        "server_main_vs_manual_main": round(tps["server_main"] / tps["manual_main"], 2),
        "server_thread_vs_manual_main": round(tps["server_thread"] / tps["manual_main"], 2),
        "full_pool_vs_manual_main": round(tps["server_thread_full_pool"] / tps["manual_main"], 2),
    }))


if __name__ == "__main__":
    main()
