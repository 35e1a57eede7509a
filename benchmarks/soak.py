"""Soak test of `minigpt serve`: clients that come and go for many minutes, a fraction of them
hanging up mid-stream or mid-upload, and the server must end as it started.

    python benchmarks/soak.py [--run runs/bench-serve] [--minutes 10] [--clients 16] [--drop 0.3]

Starts `minigpt serve` on 127.0.0.1 and drives it with `--clients` asyncio clients (one process, a
new connection per request): streaming and non-streaming /v1/completions and chat requests with
random prompts, lengths, n and seeds; a `--drop` fraction of them disconnect at a random point
(while sending the body, while waiting, while streaming). The server's RSS (its process and the
engine process) is read from /proc after a one-minute warm-up and at the end; when the load stops, /health's running
and waiting must come back to 0 and /metrics must answer. Last line: JSON, with `ok` true when RSS
grew under 10%, no rows leaked, no request got a 5xx and the server logged no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:", "JULIET:\n", "First Citizen:", "KING HENRY:\nMy lord, ", "To be", "O, ", ""]


def rss_kib(pid: int) -> int:
    """Resident memory of the server and its children (the engine process), in KiB."""
    total, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(stat.parent.name) != pid and int(fields[1]) != pid:
                continue
            for line in (stat.parent / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total, found = total + int(line.split()[1]), True
        except OSError:  # it ended meanwhile
            continue
    if not found:
        raise RuntimeError("no VmRSS")
    return total


def request_body(rng: random.Random) -> tuple[str, dict]:
    settings = {"max_tokens": rng.randint(1, 96), "temperature": rng.choice([0, 0.8, 1.0]),
                "seed": rng.randrange(1000), "stream": rng.random() < 0.7}
    if rng.random() < 0.3:
        return "/v1/chat/completions", {**settings, "messages": [
            {"role": "user", "content": rng.choice(PROMPTS) or "Hello"}]}
    return "/v1/completions", {**settings, "prompt": rng.choice(PROMPTS), "n": rng.choice([1, 1, 2])}


async def one(port: int, rng: random.Random, drop: float, stats: dict) -> None:
    path, body = request_body(rng)
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        hang_up = rng.random() < drop
        if hang_up and rng.random() < 0.3:  # mid-upload
            writer.write(head + data[: len(data) // 2])
            await writer.drain()
            stats["dropped"] += 1
            return
        writer.write(head + data)
        status = await reader.readline()
        code = int(status.split()[1]) if len(status.split()) > 1 else 0
        stats["status"][code] = stats["status"].get(code, 0) + 1
        if hang_up:  # mid-stream (or mid-wait): read a little, then go
            await reader.read(rng.randint(0, 400))
            stats["dropped"] += 1
            return
        while await reader.read(65536):
            pass
        stats["completed"] += 1
    finally:
        writer.close()


async def load(port: int, clients: int, seconds: float, drop: float, seed: int) -> dict:
    stats = {"completed": 0, "dropped": 0, "errors": 0, "status": {}}
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < stop:
            try:
                await one(port, rng, drop, stats)
            except (OSError, asyncio.IncompleteReadError):
                stats["errors"] += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench-serve"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--drop", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not Path(args.run).exists():
        sys.exit(f"{args.run} not found: train one first, e.g. `minigpt train --preset small "
                 f"--max-iters 200 --out {args.run}`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = tempfile.NamedTemporaryFile("w+", prefix="soak-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", args.run, "--port",
                             str(port), "--device", "cpu"], env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("server did not start")
            time.sleep(0.2)
        warm = min(60.0, args.minutes * 60 / 5)
        first = asyncio.run(load(port, args.clients, warm, args.drop, 0))
        rss_start = rss_kib(proc.pid)
        rest = asyncio.run(load(port, args.clients, args.minutes * 60 - warm, args.drop, 1))
        rss_end = rss_kib(proc.pid)
        health: dict = {}
        for _ in range(100):  # rows of dropped clients are freed at the next step
            health = httpx.get(f"{base}/health", timeout=5).json()
            if health["running"] == 0 and health["waiting"] == 0:
                break
            time.sleep(0.1)
        metrics = httpx.get(f"{base}/metrics", timeout=5)
        statuses: dict = {}
        for st in (first, rest):
            for code, n in st["status"].items():
                statuses[code] = statuses.get(code, 0) + n
        five = sum(n for code, n in statuses.items() if code >= 500)
        growth = rss_end / rss_start - 1
        tracebacks = Path(log.name).read_text(errors="replace").count("Traceback")
        ok = (growth < 0.10 and health["running"] == 0 and health["waiting"] == 0
              and metrics.status_code == 200 and five == 0 and tracebacks == 0)
        print(f"{first['completed'] + rest['completed']:,} completed, "
              f"{first['dropped'] + rest['dropped']:,} dropped, statuses {statuses}; "
              f"RSS {rss_start / 1024:.0f} -> {rss_end / 1024:.0f} MiB ({growth:+.1%}); "
              f"after: running {health['running']}, waiting {health['waiting']}")
        print(json.dumps({"bench": "soak", "minutes": args.minutes, "clients": args.clients,
                          "drop": args.drop, "completed": first["completed"] + rest["completed"],
                          "dropped": first["dropped"] + rest["dropped"],
                          "client_errors": first["errors"] + rest["errors"],
                          "statuses": {str(k): v for k, v in sorted(statuses.items())},
                          "rss_mib": [round(rss_start / 1024), round(rss_end / 1024)],
                          "rss_growth": round(growth, 4), "running_after": health["running"],
                          "waiting_after": health["waiting"], "server_tracebacks": tracebacks,
                          "server_log": log.name, "ok": ok}))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
