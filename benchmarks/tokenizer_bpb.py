"""Char, bytes and BPE tokenizers on the same text for the same training time, compared in bits per byte.

Each tokenizer prepares Tiny Shakespeare (the bundled corpus, or --data); two probe runs (20 and 120
steps) measure its CPU seconds per step, and the real run gets as many steps as fit in --budget CPU
seconds (every run has a complete LR schedule and one evaluation, at the end). The budget is CPU time
of this process, not wall time, so that other work on a shared machine does not hand one tokenizer
more training than another; with one thread (the default here) and an idle machine the two are equal.
The final evaluation's val bits per byte is the score: lower means the model predicts the same
validation text better. Samples of each run (same prompt, about the same number of characters) follow.

    flock /tmp/minigpt-bench.lock python benchmarks/tokenizer_bpb.py --budget 180 \\
        [--tokenizers char bytes bpe:1024] [--preset small] [--threads 1] [--keep DIR]

Prints a table, the samples, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import torch  # noqa: E402

import minigpt  # noqa: E402
from minigpt.data.corpus import bundled_corpus  # noqa: E402
from minigpt.data.prepare import prepare  # noqa: E402

PROBES = (20, 120)  # steps; the difference times steps alone, without start-up and evaluation


def run_tokenizer(spec: str, args: argparse.Namespace, work: Path) -> dict:
    kind, _, vocab = spec.partition(":")
    vocab_size = int(vocab) if vocab else None
    data = work / f"data-{spec.replace(':', '-')}"
    meta = prepare([args.data], data, tokenizer=kind, vocab_size=vocab_size, progress=False)
    common = dict(preset=args.preset, data=str(data), sample_tokens=0, progress=False, device=args.device,
                  overwrite=True, threads=args.threads)  # fixed: auto threads would vary with load
    cpu = []
    for steps in (PROBES[0], *PROBES):  # the first run only pays one-time costs (imports, allocator)
        t = time.process_time()
        minigpt.train(out=str(work / f"probe-{spec.replace(':', '-')}"), max_iters=steps,
                      eval_interval=steps, eval_iters=1, **common)
        cpu.append(time.process_time() - t)
    cpu_per_step = (cpu[2] - cpu[1]) / (PROBES[1] - PROBES[0])
    steps = max(PROBES[1], int(args.budget / cpu_per_step))
    run_dir = work / f"run-{spec.replace(':', '-')}"
    t, wall = time.process_time(), time.perf_counter()
    summary = minigpt.train(out=str(run_dir), max_iters=steps, eval_interval=steps,
                            eval_iters=args.eval_iters, **common)
    cpu_seconds, wall_seconds = time.process_time() - t, time.perf_counter() - wall
    bytes_per_token = meta["train_bytes"] / meta["train_tokens"]
    sample = minigpt.load(run_dir).generate(
        args.prompt, max_new_tokens=max(1, round(args.sample_chars / bytes_per_token)),
        temperature=0.8, seed=args.seed)
    return {
        "tokenizer": spec, "vocab_size": meta["vocab_size"], "params": summary["params"],
        "bytes_per_token": round(bytes_per_token, 3), "steps": summary["step"],
        "cpu_seconds": round(cpu_seconds, 1), "wall_seconds": round(wall_seconds, 1),
        "val_loss": round(summary["val_loss"], 4),
        "val_bpb": round(summary["val_bpb"], 4), "best_val_bpb": round(summary["best_val_bpb"], 4),
        "tokens_per_sec": round(summary["tokens_per_sec"]), "sample": args.prompt + sample,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=180, help="CPU seconds of training per tokenizer")
    ap.add_argument("--tokenizers", nargs="+", default=["char", "bytes", "bpe:1024"],
                    help="kinds, bpe with :VOCAB")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data", default=str(bundled_corpus()))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--eval-iters", type=int, default=100)
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--sample-chars", type=int, default=300, help="about this many bytes per sample")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", help="keep the data and run directories here (default: deleted)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="minigpt-bpb-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = [run_tokenizer(spec, args, work) for spec in args.tokenizers]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{'tokenizer':<10} {'vocab':>6} {'params':>9} {'bytes/tok':>9} {'steps':>6} {'CPU s':>7} "
          f"{'wall s':>7} {'val loss':>8} {'val bpb':>8}")
    for r in results:
        print(f"{r['tokenizer']:<10} {r['vocab_size']:>6} {r['params']:>9,} {r['bytes_per_token']:>9.2f} "
              f"{r['steps']:>6} {r['cpu_seconds']:>7.1f} {r['wall_seconds']:>7.1f} {r['val_loss']:>8.4f} "
              f"{r['val_bpb']:>8.4f}")
    for r in results:
        print(f"\n--- {r['tokenizer']} (val bpb {r['val_bpb']:.4f}) ---\n{r['sample']}")
    print(json.dumps({"preset": args.preset, "budget_s": args.budget, "threads": torch.get_num_threads(),
                      "results": results}, ensure_ascii=False))


if __name__ == "__main__":
    main()
