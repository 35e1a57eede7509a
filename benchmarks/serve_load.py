"""Load benchmark for `minigpt serve`: N concurrent streaming clients for T seconds on loopback.

    flock /tmp/minigpt-bench.lock timeout 900 python benchmarks/serve_load.py  # 1, 8, 32 x 15 s
    flock /tmp/minigpt-bench.lock python benchmarks/serve_load.py --clients 1,8,32,128 --duration 60

Starts `minigpt serve` as a subprocess on 127.0.0.1 (free port) for a run trained by this script if
missing (small preset, 200 iterations on the bundled Tiny Shakespeare: runs/bench-serve), then
each client sends streaming /v1/completions requests back to back. Every request has a (prompt,
seed) pair out of a fixed set whose texts differ; the expected text of each pair is computed first by
the Engine in this process, so a lost, truncated or mixed-up stream shows up as a mismatch.
Reports requests/s, tokens/s, p50/p99 latency (request sent -> [DONE]) and time to first token,
for each client count in turn against the same server, and first the Engine's own single-stream
tokens/s in this process (the ceiling one streaming client is compared with). A stream whose text
differs from the single-stream one is an error; it is reported as `mixed` when it equals another
request's expected text (a routing bug) and as `diverged` otherwise (batched rounding changed a
sampled token: docs/server.md, "Reproducibility"). 429 answers are counted apart (the client waits
its Retry-After and goes on); any other status is an error. Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

PROMPTS = ["ROMEO:", "JULIET:\n", "First Citizen:", "KING HENRY:\nMy lord, ", "To be", "O, "]


@dataclass
class Result:
    spec: int
    ok: bool
    error: str | None
    latency: float
    ttft: float | None
    tokens: int
    kind: str = "ok"  # ok | busy (429) | mixed | diverged | error


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "bench-serve"),
                   help="run to serve; trained (small preset) if it does not exist")
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--clients", default="1,8,32",
                   help="comma-separated client counts, run one after the other")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of new requests, each")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--specs", type=int, default=24, help="distinct (prompt, seed) pairs")
    p.add_argument("--max-concurrency", type=int, default=32, help="rows in the server's batch")
    p.add_argument("--max-queue", type=int, default=64, help="server's waiting line")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the server and in this process (0: torch's own choice); "
                        "1 by default: a small model is overhead-bound, and on a loaded machine "
                        "OpenMP threads that spin-wait for each other cost 40x")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--no-nodelay", dest="nodelay", action="store_false",
                   help="leave Nagle's algorithm on in the client, as httpx (and so the openai "
                        "client) does by default: +40 ms to every first token on Linux")
    p.add_argument("--ratio-rounds", type=int, default=4,
                   help="alternate this many 3 s slices of Engine and of one streaming client "
                        "(a loaded machine's speed drifts: slices side by side compare fairly)")
    return p.parse_args()


def ensure_run(run_dir: Path, iters: int) -> None:
    if (run_dir / "config.json").exists():
        return
    from minigpt import train

    print(f"training {run_dir} (small preset, {iters} iterations on Tiny Shakespeare)", flush=True)
    t = time.perf_counter()
    train(preset="small", out=str(run_dir), max_iters=iters, eval_interval=iters, eval_iters=5,
          sample_tokens=0, progress=False, device="cpu", overwrite=True)
    print(f"trained in {time.perf_counter() - t:.0f}s", flush=True)


def expected_texts(run_dir: Path, specs: list[tuple[str, int]], max_tokens: int,
                   temperature: float) -> list[str]:
    from minigpt import load

    engine = load(run_dir, device="cpu")
    return [engine.generate(p, max_new_tokens=max_tokens, temperature=temperature, seed=s)
            for p, s in specs]


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("MINIGPT_API_KEY", None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "minigpt", "serve", args.run_dir, "--host", "127.0.0.1",
           "--port", "0", "--device", "cpu", "--max-tokens-limit", str(args.max_tokens),
           "--max-concurrency", str(args.max_concurrency), "--max-queue", str(args.max_queue)]
    log = open(log_path, "w")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if " on http://" in text:
            url = text.split(" on http://")[1].split()[0]
            return proc, f"http://{url}"
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


async def one_request(http: httpx.AsyncClient, url: str, spec: int, prompt: str, seed: int,
                      args: argparse.Namespace, expected: list[str]) -> Result:
    body = {"prompt": prompt, "seed": seed, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    text, tokens, done = "", 0, False

    def fail(error: str, kind: str = "error") -> Result:
        return Result(spec, False, error, time.perf_counter() - t0, ttft, tokens, kind)

    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return fail(f"HTTP {r.status_code}: {r.text[:200]}",
                            "busy" if r.status_code == 429 else "error")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    return fail(f"stream error: {chunk['error']['message']}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    if c["text"] and ttft is None:
                        ttft = time.perf_counter() - t0
                    text += c["text"]
    except (httpx.HTTPError, OSError, ValueError) as e:
        return fail(f"{type(e).__name__}: {e}")
    if not done:
        return fail("stream ended without [DONE]")
    if text != expected[spec]:
        kind = "mixed" if text in expected else "diverged"
        at = next((i for i, (a, b) in enumerate(zip(text, expected[spec])) if a != b),
                  min(len(text), len(expected[spec])))
        return fail(f"{kind} stream for spec {spec} from character {at}: {text[:40]!r} != "
                    f"{expected[spec][:40]!r}", kind)
    return Result(spec, True, None, time.perf_counter() - t0, ttft, tokens)


async def client(cid: int, clients: int, http: httpx.AsyncClient, url: str, specs, expected,
                 args, stop_at: float, results: list[Result]) -> None:
    k = 0
    while time.perf_counter() < stop_at:
        spec = (cid + k * clients) % len(specs)
        prompt, seed = specs[spec]
        result = await one_request(http, url, spec, prompt, seed, args, expected)
        results.append(result)
        if result.kind == "busy":
            await asyncio.sleep(1.0)  # the server's Retry-After
        k += 1


async def load(url: str, clients: int, specs, expected, args,
               duration: float | None = None) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(args.request_timeout)
    # httpx writes a request's headers and body in two sends without TCP_NODELAY: Nagle holds the
    # body until the server ACKs the headers, which Linux delays ~40 ms. That is the client's
    # cost, not the server's (a raw socket sees a 10 ms first token where httpx saw 50 ms).
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)] if args.nodelay else []
    transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=nodelay)
    results: list[Result] = []
    async with httpx.AsyncClient(transport=transport, timeout=timeout) as http:
        t0 = time.perf_counter()
        stop_at = t0 + (args.duration if duration is None else duration)
        await asyncio.gather(*(client(c, clients, http, url, specs, expected, args, stop_at,
                                      results) for c in range(clients)))
        elapsed = time.perf_counter() - t0  # includes finishing the requests started in time
    return results, elapsed


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def engine_tokens_per_s(run_dir: Path, specs, args, seconds: float = 10.0) -> float:
    """The Engine's own single-stream speed on the same requests, in this process."""
    from minigpt import load as load_run

    engine = load_run(run_dir, device="cpu")
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for prompt, seed in specs[:6]:
            events = engine.stream(prompt, max_new_tokens=args.max_tokens,
                                   temperature=args.temperature, seed=seed)
            tokens += sum(e.token is not None for e in events)
    return tokens / (time.perf_counter() - t0)


def summarize(clients: int, results: list[Result], elapsed: float, args) -> dict:
    ok = [r for r in results if r.ok]
    kinds = {k: sum(r.kind == k for r in results) for k in ("busy", "mixed", "diverged", "error")}
    for r in [r for r in results if not r.ok and r.kind != "busy"][:5]:
        print(f"  {r.kind}: {r.error}", file=sys.stderr)
    latencies = [r.latency for r in ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.tokens for r in ok)
    return {
        "clients": clients, "duration_s": round(elapsed, 2), "requests": len(results),
        "ok": len(ok), "answered_429": kinds["busy"], "mixed": kinds["mixed"],
        "diverged": kinds["diverged"], "errors": kinds["error"],
        "requests_per_s": round(len(ok) / elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1),
        "latency_p50_s": round(pct(latencies, 50), 3), "latency_p99_s": round(pct(latencies, 99), 3),
        "ttft_p50_s": round(pct(ttfts, 50), 3), "ttft_p99_s": round(pct(ttfts, 99), 3),
        "mean_tokens_per_request": round(statistics.fmean(r.tokens for r in ok), 1) if ok else 0,
    }


def one_client_ratio(url: str, run_dir: Path, specs, expected, args) -> float | None:
    """One streaming client's tokens/s over the Engine's, from alternating 3 s slices."""
    if not args.ratio_rounds:
        return None
    engine_tokens = served_tokens = engine_s = served_s = 0.0
    for _ in range(args.ratio_rounds):
        tps = engine_tokens_per_s(run_dir, specs, args, seconds=3.0)
        engine_tokens, engine_s = engine_tokens + tps * 3.0, engine_s + 3.0
        results, elapsed = asyncio.run(load(url, 1, specs, expected, args, duration=3.0))
        served_tokens += sum(r.tokens for r in results if r.ok)
        served_s += elapsed
    ratio = (served_tokens / served_s) / (engine_tokens / engine_s)
    print(f"alternating slices: Engine {engine_tokens / engine_s:.0f} tokens/s, one streaming "
          f"client {served_tokens / served_s:.0f} tokens/s: {100 * ratio:.0f}%", flush=True)
    return ratio


def main() -> int:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    ensure_run(run_dir, args.train_iters)
    counts = [int(c) for c in args.clients.split(",")]
    specs = [(PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(args.specs)]
    expected = expected_texts(run_dir, specs, args.max_tokens, args.temperature)
    print(f"{len(specs)} request kinds, {len(set(expected))} distinct expected texts "
          f"({args.max_tokens} tokens, temperature {args.temperature})", flush=True)
    engine_tps = before = engine_tokens_per_s(run_dir, specs, args)
    print(f"Engine.stream in process, one stream: {engine_tps:.0f} tokens/s", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        proc, url = start_server(args, log_path)
        try:
            ratio = one_client_ratio(url, run_dir, specs, expected, args)
            for clients in counts:
                print(f"server {url}: {args.max_concurrency} rows, queue {args.max_queue}; "
                      f"{clients} streaming clients for {args.duration:.0f}s", flush=True)
                results, elapsed = asyncio.run(load(url, clients, specs, expected, args))
                rows.append(summarize(clients, results, elapsed, args))
                print("  " + json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # measured before and after the server's phases: a loaded machine's speed drifts, and the
    # mean of both brackets the phases better than either alone
    after = engine_tokens_per_s(run_dir, specs, args)
    print(f"Engine.stream in process, one stream, after the phases: {after:.0f} tokens/s")
    engine_tps = (engine_tps + after) / 2
    print(f"\nEngine single stream: {engine_tps:.0f} tokens/s (mean of before and after; "
          "same requests)")
    print("| clients | tokens/s | vs 1 client | requests/s | TTFT p50 / p99 | latency p50 / p99 "
          "| ok | 429 | errors (mixed / diverged / other) |")
    print("|---|---|---|---|---|---|---|---|---|")
    one = rows[0]["tokens_per_s"] if rows and rows[0]["clients"] == 1 else None
    for r in rows:
        vs = f"{r['tokens_per_s'] / one:.1f}x" if one else "-"
        print(f"| {r['clients']} | {r['tokens_per_s']:,.0f} | {vs} | {r['requests_per_s']} | "
              f"{r['ttft_p50_s']} / {r['ttft_p99_s']} s | {r['latency_p50_s']} / "
              f"{r['latency_p99_s']} s | {r['ok']} | {r['answered_429']} | "
              f"{r['mixed']} / {r['diverged']} / {r['errors']} |")
    if one:
        print(f"1 streaming client: {100 * one / engine_tps:.0f}% of the Engine's single stream")
    if ratio is not None:
        print(f"1 streaming client, alternating slices: {100 * ratio:.0f}% of the Engine's")
    print(json.dumps({"engine_tokens_per_s": round(engine_tps, 1), "phases": rows,
                      "one_client_ratio": ratio and round(ratio, 3),
                      "engine_before_after": [round(before, 1), round(after, 1)],
                      "max_tokens": args.max_tokens, "max_concurrency": args.max_concurrency,
                      "max_queue": args.max_queue, "run_dir": str(run_dir)}))
    bad = sum(r["mixed"] + r["diverged"] + r["errors"] for r in rows)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
