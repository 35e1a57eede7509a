"""`minigpt serve` against llama.cpp's `llama-server` on the same model, cores and client.

    python benchmarks/serve_vs_llama.py [--run RUN] [--clients 1,8,32] [--duration 10]
        [--rounds 2] [--threads 2] [--minigpt-threads 0] [--llama-server PATH]

The run is exported to GGUF (`minigpt export --to gguf`, so its layout must be one llama.cpp has,
as the default recipe's is; without --run, runs/bench-serve-default: the `small` preset of the
default recipe, trained 200 steps on the bundled Tiny Shakespeare) and both servers start on
127.0.0.1 with 32 parallel sequences: llama-server with `--threads` ggml threads, `minigpt serve`
as a user starts it (`--threads 0`: its engine process decodes on the idle cores but one, the HTTP
process has the other; `--minigpt-threads N` for N decoding threads). One client drives both:
asyncio in this process, a new connection per request, streaming /v1/completions of `--max-tokens`
greedy tokens from Tiny Shakespeare prompts; its own cost is a few reads and a JSON parse per
chunk. Each concurrency runs `--rounds` times per server, alternating, for `--duration` seconds
each, and reports tokens/s (completion tokens per second of the slice), time to first token
(median), latency p99 and the CPU time per token of each process (the server, minigpt's engine
process as its child, this client). Last line: JSON, with minigpt/llama ratios.

`make bench-llama-server` builds llama-server once (cached in ~/.cache/minigpt) and runs this with
it. By hand: llama-server is built from the llama.cpp sources that the llama-cpp-python sdist
vendors,

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF
    cmake --build build --target llama-server -j   # ~8 minutes on 2 cores

then pass `--llama-server .../build/bin/llama-server` or set MINIGPT_LLAMA_SERVER.
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:", "JULIET:\n", "First Citizen:", "KING HENRY:\nMy lord, ", "To be", "O, "]


@dataclass
class Slice:
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process (and client)


async def one_request(port: int, prompt: str, max_tokens: int, out: Slice) -> None:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    first, chunks, usage, buf = None, 0, None, b""
    try:
        status = await reader.readline()
        if b" 200 " not in status:
            out.errors += 1
            return
        while (await reader.readline()) not in (b"\r\n", b""):  # headers
            pass
        async for data in _chunks(reader):  # chunked transfer: SSE events across chunks
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                payload = event.removeprefix(b"data: ").strip()
                if payload == b"[DONE]" or not payload:
                    continue
                obj = json.loads(payload)
                usage = obj.get("usage") or usage
                text = ((obj.get("choices") or [{}])[0].get("text")) or ""
                if text:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
    finally:
        writer.close()
    # the usage chunk counts tokens; chunks undercount a server that gathers several per chunk
    out.tokens += usage["completion_tokens"] if usage else chunks
    out.latency.append(time.perf_counter() - start)
    if first is not None:
        out.ttft.append(first)


async def _chunks(reader: asyncio.StreamReader):
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def drive(port: int, clients: int, seconds: float, max_tokens: int) -> Slice:
    out = Slice()
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        n = i
        while time.perf_counter() < stop:
            try:
                await one_request(port, PROMPTS[n % len(PROMPTS)], max_tokens, out)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                out.errors += 1
            n += clients

    begin = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    out.elapsed = time.perf_counter() - begin
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes(pid: int) -> dict[str, int]:
    """A server's process and its children (minigpt serve's engine process), by role."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return {"server": pid, **{f"child{i}": int(k) for i, k in enumerate(kids)}}


def measured(pid: int, port: int, clients: int, seconds: float, max_tokens: int) -> Slice:
    """One slice, with the CPU seconds each server process and this client spent in it."""
    procs = processes(pid)
    before = {role: cpu_seconds(p) for role, p in procs.items()}
    client = time.process_time()
    s = asyncio.run(drive(port, clients, seconds, max_tokens))
    s.cpu = {role: cpu_seconds(p) - before[role] for role, p in procs.items()}
    s.cpu["client"] = time.process_time() - client
    return s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, port: int, path: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}: {proc.args}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"server not ready after {timeout:.0f} s: {proc.args}")


def ensure_run(run: Path) -> Path:
    if run.exists():
        return run
    from minigpt.training.run import train

    train(preset="small", out=str(run), max_iters=200, sample_tokens=0, progress=False)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench-serve-default"))
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=56)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--minigpt-threads", type=int, default=0,
                    help="minigpt serve --threads (0: its default)")
    ap.add_argument("--compile", action="store_true", help="minigpt serve --compile")
    ap.add_argument("--llama-server", default=os.environ.get("MINIGPT_LLAMA_SERVER"))
    args = ap.parse_args()
    if not args.llama_server or not Path(args.llama_server).is_file():
        sys.exit("llama-server not found: build it as this script's docstring says, then pass "
                 "--llama-server PATH or set MINIGPT_LLAMA_SERVER")
    from minigpt.engine import load
    from minigpt.interop.gguf import export_gguf

    run = ensure_run(Path(args.run))
    block = load(run, device="cpu").block_size
    tmp = Path(tempfile.mkdtemp(prefix="serve-vs-llama-"))
    gguf = tmp / "model.gguf"
    export_gguf(run, gguf)
    lp, mp = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    servers = {
        "llama": (subprocess.Popen(
            [args.llama_server, "-m", str(gguf), "--port", str(lp), "--host", "127.0.0.1",
             "-t", str(args.threads), "-tb", str(args.threads), "-np", "32",
             "-c", str(32 * block), "--no-webui", "-lv", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), lp, "/health"),
        "minigpt": (subprocess.Popen(
            [sys.executable, "-m", "minigpt", "serve", str(run), "--port", str(mp),
             "--device", "cpu", "--max-concurrency", "32", "--threads", str(args.minigpt_threads),
             *(["--compile"] if args.compile else [])],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), mp, "/health"),
    }
    try:
        for proc, port, path in servers.values():
            wait_ready(proc, port, path)
        results: dict[str, dict[int, list[Slice]]] = {name: {} for name in servers}
        for clients in (int(c) for c in args.clients.split(",")):
            for name in servers:  # warm-up slice, not counted
                asyncio.run(drive(servers[name][1], clients, 2.0, args.max_tokens))
            for _ in range(args.rounds):
                for name, (proc, port, _) in servers.items():
                    s = measured(proc.pid, port, clients, args.duration, args.max_tokens)
                    results[name].setdefault(clients, []).append(s)
        summary = {}
        for name, by_clients in results.items():
            summary[name] = {}
            for clients, slices in by_clients.items():
                lat = sorted(x for s in slices for x in s.latency)
                summary[name][clients] = {
                    "tokens_per_s": round(statistics.median(s.tokens / s.elapsed for s in slices)),
                    "ttft_p50_ms": round(1000 * statistics.median(x for s in slices for x in s.ttft)),
                    "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
                    "requests": len(lat), "errors": sum(s.errors for s in slices),
                    # where the CPU went: microseconds per completion token, by process
                    "cpu_us_per_token": {role: round(1e6 * sum(s.cpu[role] for s in slices)
                                                     / max(1, sum(s.tokens for s in slices)))
                                         for role in slices[0].cpu}}
        print(f"{'clients':>7}  {'server':8} {'tokens/s':>9} {'TTFT p50':>9} {'p99':>7} {'errors':>6}"
              "  CPU us/token by process")
        for clients in summary["minigpt"]:
            for name in servers:
                r = summary[name][clients]
                print(f"{clients:>7}  {name:8} {r['tokens_per_s']:>9,} {r['ttft_p50_ms']:>7} ms "
                      f"{r['latency_p99_s']:>6.2f}s {r['errors']:>6}  "
                      + " ".join(f"{k} {v}" for k, v in r["cpu_us_per_token"].items()))
        ratios = {c: round(summary["minigpt"][c]["tokens_per_s"]
                           / max(1, summary["llama"][c]["tokens_per_s"]), 2)
                  for c in summary["minigpt"]}
        print(json.dumps({"bench": "serve_vs_llama", "threads": args.threads,
                          "minigpt_threads": args.minigpt_threads,
                          "max_tokens": args.max_tokens, "duration": args.duration,
                          "rounds": args.rounds, "results": summary,
                          "minigpt_vs_llama_tokens_per_s": ratios}))
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
