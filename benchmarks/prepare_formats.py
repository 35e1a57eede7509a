"""Peak memory of `minigpt prepare` on JSON-lines and Parquet corpora: it must not grow with the corpus.

Generates, in a temporary directory that is deleted afterwards, a small and a large corpus of each
format (default 5 and 200 MB on disk): records of 1 to 20 consecutive Tiny Shakespeare lines, in a
seeded random order, as `{"id": N, "text": ...}` JSON lines and as a Parquet file (pyarrow's default
snappy compression, row groups of 8,192 records, written group by group). Each corpus is prepared
(char tokenizer, stream mode: both passes) in a fresh process, whose peak resident memory is read
from the kernel (getrusage's ru_maxrss) as it finishes.

    nice python benchmarks/prepare_formats.py [--sizes 5 200] [--formats jsonl parquet] [--docs lines]

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
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
MB = 1_000_000
ROWS_PER_GROUP = 8192

CHILD = """
import json, resource, sys
from minigpt.data.prepare import prepare
docs = None if sys.argv[3] == "stream" else sys.argv[3]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
meta = prepare([sys.argv[1]], sys.argv[2], docs=docs, progress=False)
print(json.dumps({"tokens": meta["train_tokens"] + meta["val_tokens"],
                  "text_bytes": meta["train_bytes"] + meta["val_bytes"],
                  "rss_after_import_mb": round(base, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def records(seed: int):
    """Endless records: runs of consecutive corpus lines, shuffled by a seeded generator."""
    lines = (SRC / "minigpt" / "data" / "tinyshakespeare.txt").read_text().splitlines()
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(lines) - 20, size=4096)
        lengths = rng.integers(1, 21, size=4096)
        for s, n in zip(starts, lengths):
            yield "\n".join(lines[s:s + n])


def write_jsonl(path: Path, size_mb: int, seed: int = 0) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(records(seed)):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            if i % 4096 == 0 and f.tell() >= size_mb * MB:
                return f.tell()
    raise AssertionError("unreachable")


def write_parquet(path: Path, size_mb: int, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    gen, n = records(seed), 0
    with pq.ParquetWriter(path, schema) as writer:
        while True:
            texts = [next(gen) for _ in range(ROWS_PER_GROUP)]
            writer.write_table(pa.table({"id": np.arange(n, n + len(texts)), "text": texts},
                                        schema=schema))
            n += len(texts)
            if path.stat().st_size >= size_mb * MB:
                break
    return path.stat().st_size


def run_one(corpus: Path, out: Path, docs: str) -> dict:
    """Prepare `corpus` in a fresh process; its wall time and the peak RSS it reports at the end."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(out), docs],
                          capture_output=True, env=env, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"prepare {corpus} failed:\n{proc.stderr}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 200], help="MB on disk per corpus")
    ap.add_argument("--formats", nargs="+", default=["jsonl", "parquet"], choices=("jsonl", "parquet"))
    ap.add_argument("--docs", default="stream", choices=("stream", "lines", "blank", "files"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="minigpt-formats-"))
    rows = []
    try:
        for fmt in args.formats:
            for size in sorted(args.sizes):
                corpus = tmp / f"corpus-{size}.{fmt}"
                disk = (write_jsonl if fmt == "jsonl" else write_parquet)(corpus, size)
                result = run_one(corpus, tmp / f"out-{fmt}-{size}", args.docs)
                rows.append({"format": fmt, "size_mb": round(disk / MB, 1), **result})
                print(f"{fmt:8} {disk / MB:8.1f} MB on disk  {result['text_bytes'] / MB:8.1f} MB text  "
                      f"{result['tokens']:>12,} tokens  {result['seconds']:7.1f} s  "
                      f"peak RSS {result['peak_rss_mb']:7.1f} MB", flush=True)
                corpus.unlink()
                shutil.rmtree(tmp / f"out-{fmt}-{size}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    growth = {}
    for fmt in args.formats:
        peaks = [r["peak_rss_mb"] for r in rows if r["format"] == fmt]
        growth[fmt] = round(peaks[-1] - peaks[0], 1)
        print(f"{fmt}: peak RSS {peaks[0]} MB -> {peaks[-1]} MB from the smallest to the largest "
              f"corpus ({growth[fmt]:+} MB)")
    print(json.dumps({"docs": args.docs, "runs": rows, "peak_rss_growth_mb": growth}))


if __name__ == "__main__":
    main()
