"""Training speed of the NumPy reference engine vs the torch engine, on the CPU.

Both engines train the same preset (default tiny) on Tiny Shakespeare for the same number of
iterations, from the same seed (so the same initial weights and batches), through the real
`minigpt.train` loop. Reported per engine: ms/iter and tokens/s over the training time the trainer
itself measures (evaluation, data preparation and checkpoint writes excluded), and the losses of the
final evaluation, which should agree between engines. The last line is JSON.

    python benchmarks/reference_vs_torch.py                 # tiny preset, 200 iterations
    python benchmarks/reference_vs_torch.py --threads 1     # torch and NumPy's BLAS on one thread

--threads sets OMP/OpenBLAS/MKL thread counts before NumPy and torch load (BLAS reads them only at
import) and torch.set_num_threads: on a busy or small machine, thread pools fighting over cores can
cost more than tiny matrices gain from them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and BLAS")
    return ap.parse_args()


def bench(engine: str, preset: str, iters: int, data: Path, out: Path) -> dict[str, float]:
    from minigpt import train
    from minigpt.config import resolve

    summary = train(
        preset=preset,
        data=str(data),
        out=str(out),
        engine=engine,
        arch="gpt2",  # the layout and optimizer the reference implements, for both engines
        optimizer="adamw",
        device="cpu",
        max_iters=iters,
        log_interval=iters,  # one log window = the whole run
        eval_interval=iters,
        eval_iters=5,
        sample_tokens=0,
        progress=False,
    )
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    mcfg, tcfg = resolve(preset)
    tokens = iters * tcfg.batch_size * tcfg.grad_accum * mcfg.block_size
    return {
        "ms_per_iter": round(1e3 * summary["elapsed"] / iters, 3),
        "tokens_per_sec": round(tokens / summary["elapsed"], 1),
        "final_train_loss": last["eval_train_loss"],
        "final_val_loss": last["val_loss"],
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import torch  # only now: thread settings are read at import

    from minigpt.data.corpus import bundled_corpus
    from minigpt.data.prepare import prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, object] = {
        "preset": args.preset,
        "iters": args.iters,
        "threads": args.threads or "default",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # shared machines: context for the figures
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([bundled_corpus()], data)  # once, outside the timed runs
        for engine in ("reference", "torch"):
            r = bench(engine, args.preset, args.iters, data, Path(tmp) / engine)
            results[engine] = r
            print(
                f"{engine:>9}: {r['ms_per_iter']:8.3f} ms/iter  {r['tokens_per_sec']:>10,.0f} tok/s"
                f"  final train loss {r['final_train_loss']:.4f}  val {r['final_val_loss']:.4f}"
            )
    ref, pt = results["reference"], results["torch"]
    # > 1: the reference is faster; < 1: it is slower (e.g. 0.5 = takes twice as long per iter)
    results["reference_speed_vs_torch"] = round(pt["ms_per_iter"] / ref["ms_per_iter"], 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
