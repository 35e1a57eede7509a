"""Load benchmark for `minigpt serve`: N concurrent streaming clients for T seconds on loopback.

    flock /tmp/minigpt-bench.lock timeout 900 python benchmarks/serve_load.py            # 32 x 30 s
    flock /tmp/minigpt-bench.lock python benchmarks/serve_load.py --clients 8 --duration 10

Starts `minigpt serve` as a subprocess on 127.0.0.1 (free port) for a run trained by this script if
missing (small preset, 200 iterations on the bundled Tiny Shakespeare: runs/bench-serve), then
each client sends streaming /v1/completions requests back to back. Every request has a (prompt,
seed) pair out of a fixed set whose texts differ; the expected text of each pair is computed first by
the Engine in this process, so a lost, truncated or mixed-up stream shows up as a mismatch.
Reports requests/s, tokens/s, p50/p99 latency (request sent -> [DONE]) and time to first token.
Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "bench-serve"),
                   help="run to serve; trained (small preset) if it does not exist")
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of new requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--specs", type=int, default=24, help="distinct (prompt, seed) pairs")
    p.add_argument("--max-concurrency", type=int, default=4, help="server's generation slots")
    p.add_argument("--max-queue", type=int, default=64, help="server's waiting line")
    p.add_argument("--server-threads", type=int, default=None,
                   help="torch threads in the server process (default: torch's own choice)")
    p.add_argument("--request-timeout", type=float, default=120.0)
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
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
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
                      args: argparse.Namespace, expected: str) -> Result:
    body = {"prompt": prompt, "seed": seed, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    text, tokens, done = "", 0, False
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(spec, False, f"HTTP {r.status_code}: {r.text[:200]}",
                              time.perf_counter() - t0, None, 0)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(spec, False, f"stream error: {chunk['error']['message']}",
                                  time.perf_counter() - t0, ttft, 0)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    if c["text"] and ttft is None:
                        ttft = time.perf_counter() - t0
                    text += c["text"]
    except (httpx.HTTPError, OSError, ValueError) as e:
        return Result(spec, False, f"{type(e).__name__}: {e}", time.perf_counter() - t0, ttft, 0)
    latency = time.perf_counter() - t0
    if not done:
        return Result(spec, False, "stream ended without [DONE]", latency, ttft, tokens)
    if text != expected:
        return Result(spec, False, f"text mismatch for spec {spec}: {text[:40]!r} != "
                                   f"{expected[:40]!r}", latency, ttft, tokens)
    return Result(spec, True, None, latency, ttft, tokens)


async def client(cid: int, http: httpx.AsyncClient, url: str, specs, expected, args,
                 stop_at: float, results: list[Result]) -> None:
    k = 0
    while time.perf_counter() < stop_at:
        spec = (cid + k * args.clients) % len(specs)
        prompt, seed = specs[spec]
        results.append(await one_request(http, url, spec, prompt, seed, args, expected[spec]))
        k += 1


async def load(url: str, specs, expected, args) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.request_timeout)
    results: list[Result] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        t0 = time.perf_counter()
        stop_at = t0 + args.duration
        await asyncio.gather(*(client(c, http, url, specs, expected, args, stop_at, results)
                               for c in range(args.clients)))
        elapsed = time.perf_counter() - t0  # includes finishing the requests started in time
    return results, elapsed


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main() -> int:
    args = parse_args()
    run_dir = Path(args.run_dir)
    ensure_run(run_dir, args.train_iters)
    specs = [(PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(args.specs)]
    expected = expected_texts(run_dir, specs, args.max_tokens, args.temperature)
    distinct = len(set(expected))
    print(f"{len(specs)} request kinds, {distinct} distinct expected texts "
          f"({args.max_tokens} tokens, temperature {args.temperature})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        proc, url = start_server(args, log_path)
        try:
            print(f"server {url}: {args.max_concurrency} slots, queue {args.max_queue}; "
                  f"{args.clients} streaming clients for {args.duration:.0f}s", flush=True)
            results, elapsed = asyncio.run(load(url, specs, expected, args))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    for r in errors[:5]:
        print(f"error: {r.error}", file=sys.stderr)
    latencies = [r.latency for r in ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.tokens for r in ok)
    summary = {
        "clients": args.clients, "duration_s": round(elapsed, 2), "requests": len(results),
        "ok": len(ok), "errors": len(errors), "mismatched": sum("mismatch" in (r.error or "")
                                                                 for r in errors),
        "requests_per_s": round(len(ok) / elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1),
        "latency_p50_s": round(pct(latencies, 50), 3), "latency_p99_s": round(pct(latencies, 99), 3),
        "ttft_p50_s": round(pct(ttfts, 50), 3), "ttft_p99_s": round(pct(ttfts, 99), 3),
        "mean_tokens_per_request": round(statistics.fmean(r.tokens for r in ok), 1) if ok else 0,
        "max_tokens": args.max_tokens, "max_concurrency": args.max_concurrency,
        "server_threads": args.server_threads, "run_dir": str(run_dir),
    }
    print(f"{len(ok)}/{len(results)} requests ok, {len(errors)} errors "
          f"({summary['mismatched']} mismatched streams) in {elapsed:.1f}s")
    print(f"{summary['requests_per_s']} requests/s, {summary['tokens_per_s']} tokens/s; latency "
          f"p50 {summary['latency_p50_s']}s p99 {summary['latency_p99_s']}s; first token p50 "
          f"{summary['ttft_p50_s']}s p99 {summary['ttft_p99_s']}s")
    print(json.dumps(summary))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
