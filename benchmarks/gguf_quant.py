"""GGUF file size and llama.cpp perplexity for each --outtype of one run, beside minigpt's own
perplexity of the same tokens. Prints a table; the last line is JSON.

    python benchmarks/gguf_quant.py [RUN] [--tokens 4096] [--steps 300] [--arch stablelm]

Perplexity is over the run's held-out split (RUN/data/val.bin): the first --tokens tokens, cut into
non-overlapping windows of the run's context, each scored from a fresh context (every token but a
window's first is predicted). RUN must have a layout GGUF export accepts. Without RUN, a model of
the `small` preset's size (--arch stablelm, the default; modern without QK-norm, gpt2 or portable) is trained for --steps steps on
the bundled Tiny Shakespeare first: quantisation error shows on a trained model, not a random one.
Needs llama-cpp-python (`make test-llama` installs it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minigpt import rundir
from minigpt.data.dataset import load_prepared
from minigpt.engine import load
from minigpt.interop.gguf import OUTTYPES, export_gguf


def fresh_run(root: Path, arch: str, steps: int) -> Path:
    from minigpt.training.run import train

    layout = dict(qk_norm=False) if arch == "modern" else {}
    train(preset="small", out=str(root / "run"), arch=arch, max_iters=steps,
          eval_interval=steps, eval_iters=5, sample_tokens=0, progress=False, **layout)
    return root / "run"


def windows(tokens: np.ndarray, size: int, n: int) -> list[list[int]]:
    tokens = [int(t) for t in tokens[: n]]
    return [tokens[i : i + size] for i in range(0, len(tokens) - size + 1, size)]


def perplexity(logits_of, chunks: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in chunks:
        logits = torch.as_tensor(logits_of(ids), dtype=torch.float32)
        nll += float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        count += len(ids) - 1
    return math.exp(nll / count)


def llama_model(path: Path, n_ctx: int, threads: int):
    import llama_cpp

    # ggml's extra buffer types (AMX / repacked q8_0) crashed on this project's build machine (a
    # general protection fault on batches of 8+ tokens); plain CPU buffers compute the same
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = plain_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                               logits_all=True, type_k=0, type_v=0, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="a run whose layout exports to GGUF (default: train one)")
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the model made without RUN")
    ap.add_argument("--arch", default="stablelm", choices=("stablelm", "modern", "gpt2", "portable"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("needs llama-cpp-python: `make test-llama` installs it", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = Path(args.run) if args.run else fresh_run(root, args.arch, args.steps)
        cfg, _ = rundir.read_config(run)
        chunks = windows(load_prepared(run / "data").val, cfg.block_size, args.tokens)
        engine = load(run, device="cpu", dtype="float32")
        with torch.no_grad():
            ours = perplexity(lambda ids: engine.model(torch.tensor([ids[:-1]]))[0][0], chunks)
        rows = []
        for outtype in OUTTYPES:
            info = export_gguf(run, root / f"{outtype}.gguf", outtype=outtype)
            llm = llama_model(root / f"{outtype}.gguf", cfg.block_size, args.threads)

            def logits_of(ids, llm=llm):
                llm.reset()
                llm.eval(ids[:-1])
                return np.asarray(llm.scores[: len(ids) - 1])

            rows.append({"outtype": outtype, "bytes": info["bytes"], "kept_f16": info["kept_f16"],
                         "perplexity": perplexity(logits_of, chunks)})
            llm.close()
    f32 = rows[0]
    for r in rows:
        r["size_vs_f32"] = r["bytes"] / f32["bytes"]
        r["perplexity_vs_f32"] = r["perplexity"] / f32["perplexity"] - 1
    scored = sum(len(c) - 1 for c in chunks)
    print(f"{cfg.n_layer} layers x {cfg.n_embd}, {engine.model.num_params():,} parameters, "
          f"{scored:,} held-out tokens; minigpt's own perplexity {ours:.4f}")
    print("| outtype | file bytes | vs f32 | llama.cpp perplexity | vs f32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['outtype']} | {r['bytes']:,} | {r['size_vs_f32']:.3f}x | {r['perplexity']:.4f} | "
              f"{r['perplexity_vs_f32']:+.3%} |")
    print(json.dumps({"params": engine.model.num_params(), "tokens": scored,
                      "minigpt_perplexity": ours, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
