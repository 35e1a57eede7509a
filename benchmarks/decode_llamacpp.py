"""Decode speed of one exported model in llama.cpp (llama-cpp-python) and in minigpt's engine, side by
side in one run: one stream, greedy, N new tokens from a short prompt, both on the same threads.
Prints figures; the last line is JSON.

    python benchmarks/decode_llamacpp.py [RUN] [--tokens 50] [--repeats 7] [--threads 2]

RUN must have a layout GGUF export accepts (--arch gpt2, or --arch modern --no-qk-norm). Without
RUN, a model of the `small` preset's size (--arch modern without QK-norm, or gpt2) is trained for a
few steps on the bundled Tiny Shakespeare first (decode speed does not depend on how well it is trained).
Needs llama-cpp-python (`make test-llama` installs it). The two tools alternate within each repeat,
so a machine that gets busier or quieter affects both alike; medians are reported, with CPU time
(all threads of this process) beside wall time, since on a shared machine wall time is noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from minigpt.engine import load
from minigpt.interop.gguf import export_gguf
from minigpt.sampling import SamplingParams


def fresh_run(root: Path, arch: str) -> Path:
    from minigpt.training.run import train

    train(preset="small", out=str(root / "run"), arch=arch, qk_norm=False, max_iters=20,
          eval_interval=20, eval_iters=2, sample_tokens=0, progress=False)
    return root / "run"


def timed(fn) -> tuple[float, float, list[int]]:
    wall, cpu = time.perf_counter(), time.process_time()
    ids = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, ids


def minigpt_decode(engine, prompt_ids: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=False)
    return engine.token_ids(prompt_ids, params)[0]


def llama_decode(llm, prompt_ids: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                            repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            return out
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="run directory (default: a fresh small-size model)")
    ap.add_argument("--arch", default="modern", choices=("modern", "gpt2"),
                    help="layout of the fresh model when no RUN is given")
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--tokens", type=int, default=50, help="new tokens per generation")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import llama_cpp

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else fresh_run(Path(tmp), args.arch)
        info = export_gguf(run, Path(tmp) / "model.gguf", checkpoint=args.checkpoint)
        engine = load(run, checkpoint=args.checkpoint, device="cpu", dtype="float32")
        if args.tokens + 1 > engine.block_size:
            sys.exit(f"--tokens must be < the context ({engine.block_size})")
        llm = llama_cpp.Llama(model_path=info["path"], n_ctx=engine.block_size, n_threads=args.threads,
                              n_threads_batch=args.threads, type_k=0, type_v=0, verbose=False)
        prompt = [engine.tokenizer.bos_id]  # one token: the figures are decode, not prefill
        rates: dict[str, list[tuple[float, float]]] = {"minigpt": [], "llama.cpp": []}
        same = True
        for r in range(args.repeats + 1):  # the first round warms both up and is not counted
            a = timed(lambda: minigpt_decode(engine, prompt, args.tokens))
            b = timed(lambda: llama_decode(llm, prompt, args.tokens))
            same &= a[2] == b[2]
            if r:
                rates["minigpt"].append(a[:2])
                rates["llama.cpp"].append(b[:2])
        llm.close()
    result = {"architecture": info["architecture"], "params": engine.model.num_params(),
              "tokens": args.tokens, "threads": args.threads, "repeats": args.repeats,
              "same_tokens": same}
    for name, rs in rates.items():
        result[f"{name}_tok_s"] = round(args.tokens / statistics.median(w for w, _ in rs), 1)
        result[f"{name}_tok_per_cpu_s"] = round(args.tokens / statistics.median(c for _, c in rs), 1)
    print(f"{info['architecture']} model, {result['params']:,} parameters, {args.tokens} new tokens "
          f"from a 1-token prompt, greedy, one stream, {args.threads} threads, median of "
          f"{args.repeats}; identical tokens: {same}")
    for name in rates:
        print(f"  {name:10s} {result[f'{name}_tok_s']:8.1f} tokens/s   "
              f"{result[f'{name}_tok_per_cpu_s']:8.1f} tokens per CPU-second")
    ratio = result["llama.cpp_tok_s"] / result["minigpt_tok_s"]
    result["llama_over_minigpt"] = round(ratio, 2)
    print(f"  llama.cpp / minigpt: {ratio:.2f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
