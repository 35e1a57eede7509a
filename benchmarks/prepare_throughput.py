"""How fast `minigpt prepare` reads a large corpus, and that its memory does not grow with the corpus.

Generates corpora of the given sizes (default 50 and 200 MB: Tiny Shakespeare's lines in a seeded
random order) in a temporary directory, which is deleted afterwards. Each (tokenizer, size) runs
`prepare` in a fresh process that reports its own wall time and peak resident memory. MB/s covers the
whole command: both passes (learning the vocabulary, then encoding and writing the .bin files).

    flock /tmp/minigpt-bench.lock python benchmarks/prepare_throughput.py [--sizes 50 200]
        [--tokenizers char bytes bpe] [--vocab-size 1024]

Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
MB = 1_000_000

CHILD = """
import json, resource, sys, time
from minigpt.data.prepare import prepare
corpus, out, kind, vocab = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
meta = prepare([corpus], out, tokenizer=kind, vocab_size=vocab if kind == "bpe" else None,
               progress=False)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "rss_after_import_mb": base,
                  "tokens": meta["train_tokens"] + meta["val_tokens"], "vocab": meta["vocab_size"]}))
"""


def write_corpus(path: Path, size_mb: int, seed: int = 0) -> int:
    """Shuffled lines of the bundled corpus until the file holds size_mb MB; returns its bytes."""
    lines = (SRC / "minigpt" / "data" / "tinyshakespeare.txt").read_text().splitlines(keepends=True)
    rng = np.random.default_rng(seed)
    target, written = size_mb * MB, 0
    with open(path, "w") as f:
        while written < target:
            block = "".join(lines[i] for i in rng.permutation(len(lines)))
            block = block[: target - written]
            f.write(block)
            written += len(block.encode())
    return written


def run_one(corpus: Path, out: Path, kind: str, vocab: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(out), kind, str(vocab)],
                          env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed for {kind} on {corpus}:\n{proc.stderr}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200], help="corpus sizes in MB")
    ap.add_argument("--tokenizers", nargs="+", default=["char", "bytes", "bpe"])
    ap.add_argument("--vocab-size", type=int, default=1024, help="for bpe")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="minigpt-prepare-bench-"))
    results = []
    try:
        for size in args.sizes:
            corpus = work / f"corpus-{size}mb.txt"
            nbytes = write_corpus(corpus, size)
            for kind in args.tokenizers:
                r = run_one(corpus, work / "out", kind, args.vocab_size)
                r.update(tokenizer=kind, corpus_mb=nbytes / MB, mb_per_s=nbytes / MB / r["seconds"])
                results.append(r)
                print(f"{kind:>5} {nbytes / MB:7.1f} MB  {r['seconds']:7.1f} s  {r['mb_per_s']:6.2f} MB/s  "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MB (after imports {r['rss_after_import_mb']:.0f} MB)"
                      f"  {r['tokens']:,} tokens, vocab {r['vocab']}", flush=True)
            corpus.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    growth = {}
    if len(args.sizes) > 1:
        small, large = min(args.sizes), max(args.sizes)
        for kind in args.tokenizers:
            rss = {round(r["corpus_mb"]): r["peak_rss_mb"] for r in results if r["tokenizer"] == kind}
            growth[kind] = rss[large] - rss[small]
            print(f"{kind:>5}: peak RSS {rss[small]:.0f} MB at {small} MB, {rss[large]:.0f} MB at {large} MB "
                  f"(growth {growth[kind]:+.0f} MB for {large / small:.0f}x the text)")
    print(json.dumps({"cpu_count": os.cpu_count(), "results": results, "peak_rss_growth_mb": growth}))


if __name__ == "__main__":
    main()
