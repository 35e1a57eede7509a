"""Structured output: how many samples match, and what the constraint costs in tokens/s.

    PYTHONPATH=src python benchmarks/structured.py [--samples 64] [--iters 200] [--repeats 3]

1. Match counts: a names model (char tokenizer, one name per line) and a JSON-records model (bytes
   tokenizer, one JSON object per line), trained here for --iters steps at 2 layers x 64 dims;
   --samples samples each under a regex ("K" then 2 to 6 letters) and a JSON schema (a record
   with a name, an age and a city), checked with `re.fullmatch` and `jsonschema.validate`.
2. Cost: a `small` preset model (4 layers, 128 dims; random weights: speed does not depend on
   them) with the bytes vocabulary, 1 and 32 rows, 64 new tokens each, with the JSON schema and
   without (the unconstrained rows run all 64 tokens: --no-stop-at-eos). Tokens/s is generated
   tokens over wall time through `Engine.stream` (the batcher), the median of --repeats runs, one
   torch thread. Last line: JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import jsonschema
import torch

import minigpt
from minigpt import Constraint
from minigpt.config import resolve
from minigpt.engine import Engine
from minigpt.model import GPT
from minigpt.tokenization.bytes import ByteTokenizer

NAME = r"K[a-z]{2,6}"
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,7}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
NAMES = ["Kate", "Karl", "Kim", "Anna", "Bob", "Kevin", "Karen", "Lena", "Mia", "Kurt", "Oskar",
         "Paula", "Klara", "Jonas", "Emil", "Kai"]
MODEL = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=16, eval_iters=2,
             sample_tokens=0, progress=False)


def train(root: Path, name: str, text: str, iters: int, **kw) -> Engine:
    (root / f"{name}.txt").write_text(text)
    minigpt.train(data=str(root / f"{name}.txt"), out=str(root / name), docs="lines",
                  max_iters=iters, eval_interval=iters, **MODEL, **kw)
    return minigpt.load(root / name)


def texts(engine: Engine, constraint: Constraint, n: int, **kw) -> list[tuple[str, str]]:
    out, finish = [""] * n, [""] * n
    for ev in engine.stream("", constraint=constraint, num_samples=n, seed=0, **kw):
        out[ev.index] += ev.text
        finish[ev.index] = ev.finish_reason or finish[ev.index]
    return list(zip(out, finish))


def valid_record(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), RECORD)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def tokens_per_s(engine: Engine, rows: int, constrained: bool, repeats: int) -> float:
    kw = dict(constraint=Constraint.json_schema(RECORD)) if constrained else dict(stop_at_eos=False)
    engine.generate_many("", rows, max_new_tokens=4, **kw)  # compile, warm up
    rates = []
    for r in range(repeats):
        start, count = time.perf_counter(), 0
        for ev in engine.stream("", num_samples=rows, max_new_tokens=64, seed=r, temperature=1.0,
                                **kw):
            count += ev.token is not None
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = train(root, "names", "\n".join(rng.choice(NAMES) for _ in range(2000)) + "\n",
                      args.iters)
        records = train(root, "records", "\n".join(json.dumps(
            {"name": rng.choice(NAMES), "age": rng.randrange(100),
             "city": rng.choice(["Paris", "Rome", "Oslo"])}) for _ in range(2000)) + "\n",
            args.iters, tokenizer="bytes")
        out = texts(names, Constraint.regex(NAME), args.samples, max_new_tokens=20)
        matched = sum(bool(re.fullmatch(NAME, t)) for t, _ in out)
        print(f"names:   {matched}/{args.samples} match {NAME}  e.g. "
              f"{', '.join(t for t, _ in out[:6])}")
        result["names"] = {"matched": matched, "samples": args.samples,
                           "stopped": sum(f == "stop" for _, f in out)}
        out = texts(records, Constraint.json_schema(RECORD), args.samples, max_new_tokens=80)
        matched = sum(valid_record(t) for t, _ in out)
        print(f"records: {matched}/{args.samples} validate  e.g. {out[0][0]}")
        result["records"] = {"matched": matched, "samples": args.samples,
                             "stopped": sum(f == "stop" for _, f in out)}

    tok = ByteTokenizer()
    torch.manual_seed(0)
    engine = Engine(GPT(dataclasses.replace(resolve("small")[0], vocab_size=tok.vocab_size)), tok)
    result["tokens_per_s"] = {}
    for rows in (1, 32):
        free = tokens_per_s(engine, rows, False, args.repeats)
        shaped = tokens_per_s(engine, rows, True, args.repeats)
        print(f"{rows:>2} rows: {free:8.0f} tok/s unconstrained, {shaped:8.0f} tok/s with the "
              f"JSON schema ({shaped / free - 1:+.1%})")
        result["tokens_per_s"][str(rows)] = {"unconstrained": round(free),
                                             "json_schema": round(shaped),
                                             "change": round(shaped / free - 1, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
