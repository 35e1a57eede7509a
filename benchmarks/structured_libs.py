"""llguidance vs xgrammar on minigpt's tokenizers: the measurement that chose structured.py's library.

    PYTHONPATH=src python benchmarks/structured_libs.py [--gpt2 DIR]

For each vocabulary (the `small` preset's char tokenizer on tinyshakespeare, a bpe of 1024 tokens,
and GPT-2's 50257 tokens when --gpt2 names a directory with encoder.json + vocab.bpe, or a
tokenizer.json) and each library: the time to build its tokenizer (once per engine), to compile a
JSON schema and a regex (once per request), and per decode step the time to compute the allowed
tokens of 1 and of 32 rows, apply them to (rows, vocab) logits and advance every matcher with a
token drawn from the allowed ones. One thread; wall time, the median of repeated runs. Last line:
JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from minigpt.tokenization import BPETokenizer, CharTokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
    "required": ["name", "age", "city"], "additionalProperties": False}
REGEX = r"K[a-z]{2,6}"
STEPS = 40


def tinyshakespeare() -> str:
    from importlib import resources

    return resources.files("minigpt.data").joinpath("tinyshakespeare.txt").read_text("utf-8")


def gpt2_tokenizer(path: Path) -> BPETokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if (path / "tokenizer.json").exists():
        hf = Tokenizer.from_file(str(path / "tokenizer.json"))
    else:
        hf = Tokenizer(models.BPE.from_file(str(path / "encoder.json"), str(path / "vocab.bpe")))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    return BPETokenizer(hf, json.loads(hf.to_str()), bos="<|endoftext|>", eos="<|endoftext|>")


class LLG:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance

        self.ll = llguidance
        tokens = [tok.token_bytes(i) or b"\xff<special%d>" % i for i in range(tok.vocab_size)]

        class Wrapper:
            eos_token_id, bos_token_id = tok.eos_id, tok.bos_id
            special_token_ids = sorted({tok.bos_id, tok.eos_id})

            def __init__(self):
                self.tokens = tokens

            def __call__(self, s):
                return tok.encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes)
                                  else s)

        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapper()))
        self.vocab = tok.vocab_size
        self.executor = llguidance.LLExecutor(num_threads=1)

    def compile(self, kind, spec):
        M = self.ll.LLMatcher
        grammar = (M.grammar_from_json_schema(spec) if kind == "json"
                   else M.grammar_from_regex(spec))
        return grammar

    def matcher(self, grammar):
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def bitmask(self, rows):
        return torch.full(((rows, (self.vocab + 31) // 32)), -1, dtype=torch.int32)

    def fill(self, matchers, bitmask):
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.size(1) * 4)
        else:
            self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                                  bitmask.data_ptr(), bitmask.size(1) * 4,
                                                  bitmask.size(0))

    def consume(self, m, token):
        assert m.consume_token(token), m.get_error()

    def done(self, m):
        return m.is_stopped() or m.is_accepting()


class XGR:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar

        self.xg = xgrammar
        vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=tok.vocab_size,
                                      stop_token_ids=[tok.eos_id])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab = tok.vocab_size
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=1)

    def compile(self, kind, spec):
        return (self.compiler.compile_json_schema(json.dumps(spec)) if kind == "json"
                else self.compiler.compile_regex(spec))

    def matcher(self, compiled):
        return self.xg.GrammarMatcher(compiled)

    def bitmask(self, rows):
        return self.xg.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matchers, bitmask):
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def consume(self, m, token):
        assert m.accept_token(token)

    def done(self, m):
        return m.is_terminated()


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The bitmask (rows, words) as a bool (rows, vocab) mask."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(bitmask.size(0), -1)[:, :vocab] != 0


def median_ms(fn, repeats=5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def step_cost(lib, compiled, rows: int) -> float:
    """ms per decode step for `rows` rows of the library's own work: compute every row's allowed
    tokens and advance every matcher (the token is drawn among the allowed ones outside the
    clock: that part, and applying the mask, are minigpt's and the same for both)."""
    rng = random.Random(0)
    bitmask = lib.bitmask(rows)
    total, steps = 0.0, 0
    for _ in range(3):
        matchers = [lib.matcher(compiled) for _ in range(rows)]
        for _ in range(STEPS):
            t = time.perf_counter()
            lib.fill(matchers, bitmask)
            total += time.perf_counter() - t
            allowed = unpack(bitmask, lib.vocab)
            chosen = [rng.choice(row.nonzero().flatten().tolist()) for row in allowed]
            t = time.perf_counter()
            for m, token in zip(matchers, chosen):
                lib.consume(m, token)
            total += time.perf_counter() - t
            steps += 1
            if any(lib.done(m) for m in matchers):
                break
    return total / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpt2", type=Path, help="directory with GPT-2's encoder.json + vocab.bpe")
    args = ap.parse_args()
    torch.set_num_threads(1)
    text = tinyshakespeare()
    # the char vocabulary also needs JSON's punctuation, which the plays never use
    vocabs = {"char": CharTokenizer.train([text + '{}[]"_0123456789']), "bpe1024": BPETokenizer.train([text],
                                                                                  vocab_size=1024)}
    if args.gpt2:
        vocabs["gpt2"] = gpt2_tokenizer(args.gpt2)
    results = []
    for vname, tok in vocabs.items():
        for cls in (LLG, XGR):
            t = time.perf_counter()
            lib = cls(tok)
            build = (time.perf_counter() - t) * 1e3
            row = {"vocab": vname, "size": tok.vocab_size, "library": cls.name,
                   "tokenizer_ms": round(build, 1)}
            for kind, spec in (("json", SCHEMA), ("regex", REGEX)):
                row[f"compile_{kind}_ms"] = round(median_ms(
                    lambda lib=lib, kind=kind, spec=spec: lib.matcher(lib.compile(kind, spec))), 2)
            compiled = lib.compile("json", SCHEMA)
            for rows in (1, 32):
                row[f"step_ms_{rows}"] = round(step_cost(lib, compiled, rows), 3)
            results.append(row)
            print(row, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
