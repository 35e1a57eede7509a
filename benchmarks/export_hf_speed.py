"""Decode speed of one model two ways: minigpt's engine, and its `export --to hf` directory in
transformers' `generate`, side by side in one process, greedy, batch 1, the same prompt.

Both must give the same tokens (checked); the figure is new tokens per second, median of --repeats,
in wall time and in this process's CPU time (with one thread, the CPU figure is what an idle core
gives while other processes share the machine). Without RUN, a fresh model of the small preset in
the given exportable layout (random weights: speed does not depend on them).

    python benchmarks/export_hf_speed.py [RUN] [--layout gpt2|modern] [--new-tokens 50] \\
        [--repeats 5] [--threads 1]

Needs the hf extra (transformers). Prints one line per side, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from minigpt import checkpoint as ckpt  # noqa: E402
from minigpt import rundir  # noqa: E402
from minigpt.config import resolve  # noqa: E402
from minigpt.data.corpus import bundled_corpus  # noqa: E402
from minigpt.engine import load  # noqa: E402
from minigpt.interop.hf import export_hf  # noqa: E402
from minigpt.model import GPT  # noqa: E402
from minigpt.sampling import SamplingParams  # noqa: E402
from minigpt.tokenization import CharTokenizer  # noqa: E402

LAYOUTS = {"gpt2": dict(arch="gpt2"), "modern": dict(arch="modern", qk_norm=False)}


def fresh_run(path: Path, layout: str) -> Path:
    tok = CharTokenizer.train([bundled_corpus().read_text(encoding="utf-8")])
    mcfg, tcfg = resolve(None, overrides={**LAYOUTS[layout], "vocab_size": tok.vocab_size,
                                          "out": str(path)})
    path.mkdir(parents=True)
    rundir.write_config(path, mcfg, tcfg)
    rundir.write_tokenizer(path, tok)
    torch.manual_seed(0)
    ckpt.save_checkpoint(path, 0, GPT(mcfg), None, {})
    return path


def timed(fn, repeats: int) -> tuple[list[int], float, float]:
    """fn's tokens, and the median wall and CPU seconds of `repeats` calls (after one warm-up)."""
    tokens = fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        assert fn() == tokens
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return tokens, statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?")
    ap.add_argument("--layout", choices=LAYOUTS, default="modern")
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp())
    try:
        run = Path(args.run) if args.run else fresh_run(tmp / "run", args.layout)
        summary = export_hf(run, tmp / "hf")
        engine = load(run, device="cpu", dtype="float32")
        hf = AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
        compare(args, summary, engine, hf)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(args: argparse.Namespace, summary: dict, engine, hf) -> None:
    n = args.new_tokens
    ids = engine.encode_prompt("ROMEO:")
    if len(ids) + n > engine.block_size:
        raise SystemExit(f"prompt + {n} tokens exceed the context ({engine.block_size})")
    params = SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=False)

    def ours() -> list[int]:
        return engine.token_ids(ids, params)[0]

    @torch.inference_mode()
    def theirs() -> list[int]:
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, eos_token_id=None, pad_token_id=engine.tokenizer.eos_id)
        return out[0, len(ids):].tolist()

    results = {}
    tokens = {}
    for name, fn in (("minigpt", ours), ("transformers", theirs)):
        tokens[name], wall, cpu = timed(fn, args.repeats)
        results[name] = {"tokens_per_sec": round(n / wall, 1), "cpu_tokens_per_sec": round(n / cpu, 1)}
        print(f"{name:<13} {n / wall:>8.1f} tokens/s wall, {n / cpu:>8.1f} per CPU-second")
    import transformers

    print(json.dumps({
        "bench": "export_hf_speed", "architecture": summary["architecture"],
        "params": summary["params"], "new_tokens": n, "prompt_tokens": len(ids),
        "threads": args.threads, "repeats": args.repeats, "same_tokens": tokens["minigpt"] == tokens["transformers"],
        "transformers_version": transformers.__version__, "torch": torch.__version__, **results,
        "speedup": round(results["minigpt"]["tokens_per_sec"] / results["transformers"]["tokens_per_sec"], 2),
    }))


if __name__ == "__main__":
    main()
