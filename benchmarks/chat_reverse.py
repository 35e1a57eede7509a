"""Chat fine-tuning on a task with a checkable answer: "reverse abc" -> "cba", over the 3-letter
words of an 8-letter alphabet; HELD_OUT words are never trained on, and the served model is asked
to reverse them, greedy, through /v1/chat/completions.

    python benchmarks/chat_reverse.py --out /tmp/chat-reverse [--steps 300] [--threads 1]

Writes OUT/reverse.jsonl, trains OUT/run with `minigpt train --chat` (a subprocess, timed), serves
it in-process with the run's own template and prints the accuracy; last line JSON.
tests/test_chat_finetune.py trains on the same conversations (`words`, `conversation`, `records`).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ALPHABET = "abcdefgh"
HELD_OUT = 20
SYSTEMS = ["", "Reverse the word.", "You are terse."]  # some conversations open with a system turn
TRAIN_CONVERSATIONS = 480
# the model and steps of the test and of docs/chat-finetune.md's figure
MODEL_FLAGS = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "64",
               "--batch-size", "16", "--eval-iters", "2", "--sample-tokens", "0", "--seed", "1"]


def words(seed: int = 0) -> tuple[list[str], list[str]]:
    """(held-out words, training words): every 3-letter word of ALPHABET, shuffled."""
    rng = random.Random(seed)
    every = [a + b + c for a in ALPHABET for b in ALPHABET for c in ALPHABET]
    rng.shuffle(every)
    return every[:HELD_OUT], every[HELD_OUT:]


def conversation(word: str, system: str = "") -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": f"reverse {word}"},
                         {"role": "assistant", "content": word[::-1]}]}


def records() -> list[dict]:
    """The training conversations: none of them holds a held-out word."""
    _, seen = words()
    return [conversation(w, SYSTEMS[i % len(SYSTEMS)])
            for i, w in enumerate(seen[:TRAIN_CONVERSATIONS])]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def accuracy(run: Path) -> tuple[int, list[str]]:
    """How many held-out words the served run reverses, and its replies."""
    import httpx

    from minigpt import load
    from minigpt.chat_template import load_template
    from minigpt.serve.app import create_app

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_server import serving  # uvicorn on a free loopback port, in a thread

    app = create_app(load(run, device="cpu"), model_id="reverse", template=load_template(run))
    replies = []
    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        for word in words()[0]:
            r = client.post("/v1/chat/completions", json={
                "model": "reverse", "temperature": 0, "max_tokens": 12,
                "messages": [{"role": "user", "content": f"reverse {word}"}]})
            r.raise_for_status()
            replies.append(r.json()["choices"][0]["message"]["content"])
    correct = sum(reply.strip() == w[::-1] for reply, w in zip(replies, words()[0]))
    return correct, replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(args.out / "reverse.jsonl", records())
    command = [sys.executable, "-m", "minigpt", "train", "--data", str(data), "--chat", "--out",
               str(args.out / "run"), "--overwrite", "--quiet", "--device", "cpu", "--threads",
               str(args.threads), "--max-iters", str(args.steps), "--eval-interval",
               str(args.steps), *MODEL_FLAGS]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    correct, replies = accuracy(args.out / "run")
    for word, reply in zip(words()[0], replies):
        print(f"reverse {word} -> {reply!r}")
    print(f"{correct}/{HELD_OUT} held-out words reversed after {args.steps} steps "
          f"({seconds:.1f} s of `minigpt train`, {args.threads} thread(s))")
    print(json.dumps({"steps": args.steps, "threads": args.threads, "held_out": HELD_OUT,
                      "correct": correct, "accuracy": correct / HELD_OUT,
                      "train_seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
