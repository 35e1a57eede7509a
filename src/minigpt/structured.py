"""Structured output: generation forced to match a regex, a JSON schema or a grammar.

    Constraint.regex(r"K[a-z]{2,6}")                  # a name that starts with K, 3 to 7 letters
    Constraint.json_schema({"type": "object", ...})   # a JSON record with these fields
    Constraint.grammar(gbnf_text)                     # llama.cpp's GBNF (`root ::= ...`)
    Constraint.lark(lark_text), Constraint.choice(["yes", "no"]), Constraint.json_object()

The library is xgrammar (docs/structured.md says why, with the measurement). A `Constraint` is
plain data on `SamplingParams`; `validate()` parses it without any vocabulary, so a bad pattern is
a one-line `ConfigError` wherever it comes from. `Grammars` (one per engine, `Engine.grammars`)
compiles it against the run's own tokenizer: xgrammar's vocabulary is the exact bytes of every
token (`Tokenizer.token_bytes`; special tokens have none and are never allowed, EOS only where the
text is complete), so masking is exact at token boundaries for char, bytes, bpe and GPT-2's BPE
alike. Each row of the batch then has its own `RowMatcher`; `ConstraintMask` sets every token the
row's matcher does not allow to -inf before sampling, for all constrained rows of a step at once
(rows without a constraint are not touched, and a batch without any pays nothing).

xgrammar is imported on first use: it takes a second or more, which a run without constraints
never pays; neither is torch imported here before a mask is applied (config.py imports this
module).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # config.py imports this module, and builds the CLI without torch
    import torch

KINDS = ("regex", "json_schema", "json_object", "grammar", "lark", "choice")
# what each kind is called in messages
_NAMES = {"regex": "regex", "json_schema": "JSON schema", "json_object": "JSON object",
          "grammar": "grammar (GBNF)", "lark": "grammar (Lark)", "choice": "choice"}
_CACHED = 64  # compiled grammars kept per engine (the server sees the same schema many times)


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `spec` is the regex, the schema as JSON text, the grammar's
    text, or the choices as a JSON array; "" for json_object."""

    kind: str
    spec: str = ""

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Constraint:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def grammar(cls, gbnf: str) -> Constraint:
        return cls("grammar", gbnf)

    @classmethod
    def lark(cls, text: str) -> Constraint:
        return cls("lark", text)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def from_file(cls, kind: str, path: str) -> Constraint:
        """A JSON schema ("json_schema") or a grammar ("grammar": GBNF, or Lark for a .lark file)
        read from a file: `minigpt sample --json-schema FILE | --grammar FILE`."""
        what = "JSON schema" if kind == "json_schema" else "grammar"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{what} file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not valid UTF-8"
            raise ConfigError(f"cannot read the {what} file {path}: {reason}") from None
        if kind == "grammar" and path.endswith(".lark"):
            kind = "lark"
        return cls(kind, text)

    @property
    def name(self) -> str:
        return _NAMES.get(self.kind, self.kind)

    def validate(self) -> Constraint:
        """Parse it (no vocabulary needed): a one-line ConfigError naming what is wrong."""
        if self.kind not in KINDS:
            raise ConfigError(f"unknown constraint kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if not isinstance(self.spec, str):
            raise ConfigError(f"the {self.name} must be text, got {type(self.spec).__name__}")
        _parse(self.kind, self.spec)
        return self


def _one_line(e: Exception) -> str:
    """xgrammar's message without its C++ source location ("[07:46:32] /project/cpp/x.cc:83: "),
    on one line."""
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip())
    return " ".join(text.split()) or type(e).__name__


def _choice_grammar(spec: str) -> str:
    try:
        options = json.loads(spec)
    except ValueError:
        options = None
    if (not isinstance(options, list) or not options
            or not all(isinstance(o, str) and o for o in options)):
        raise ConfigError("choice must be a non-empty list of non-empty strings")
    # a JSON string literal is a GBNF string literal: the same escapes
    return "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)


def _json_schema(spec: str) -> dict[str, Any]:
    try:
        schema = json.loads(spec)
    except ValueError as e:
        raise ConfigError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"the JSON schema must be a JSON object, got {type(schema).__name__}")
    import jsonschema

    try:  # what the schema means is JSON Schema's: check it against its own meta-schema first
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise ConfigError(f"invalid JSON schema{' at ' + where if where else ''}: "
                          f"{' '.join(e.message.split())}") from None
    return schema


@functools.lru_cache(maxsize=_CACHED)
def _parse(kind: str, spec: str) -> Any:
    """The constraint as an xgrammar.Grammar (vocabulary-free), or a one-line ConfigError."""
    import xgrammar as xg

    try:
        if kind == "regex":
            if not spec:
                raise ConfigError("the regex is empty")
            return xg.Grammar.from_regex(spec)
        if kind in ("json_schema", "json_object"):
            schema = _json_schema(spec) if kind == "json_schema" else {"type": "object"}
            # one line, with json.dumps' separators: what JSON-lines training data looks like.
            # Strict (as OpenAI's strict mode): no property the schema does not name.
            return xg.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False,
                                               strict_mode=kind == "json_schema")
        if kind == "grammar":
            return xg.Grammar.from_ebnf(spec)
        if kind == "lark":
            return xg.Grammar.from_lark(spec)
        return xg.Grammar.from_ebnf(_choice_grammar(spec))
    except ConfigError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
        raise ConfigError(f"invalid {_NAMES[kind]}: {_one_line(e)}") from None


class Grammars:
    """Constraints compiled against one tokenizer's vocabulary (built once per engine)."""

    def __init__(self, token_bytes: list[bytes], eos_id: int, vocab_size: int):
        import xgrammar as xg

        self.xg = xg
        self.vocab_size = vocab_size
        # RAW: each entry is the token's own bytes. Specials (b"") are never allowed; EOS is the
        # stop token, allowed exactly where the text is complete.
        info = xg.TokenizerInfo(token_bytes, xg.VocabType.RAW, vocab_size=vocab_size,
                                stop_token_ids=[eos_id])
        # one thread: compilation runs in the caller's thread, beside the decoding thread
        self.compiler = xg.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.compile = functools.lru_cache(maxsize=_CACHED)(self._compile)

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> Grammars:
        return cls([tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)],
                   tokenizer.eos_id, vocab_size or tokenizer.vocab_size)

    def _compile(self, constraint: Constraint) -> Any:
        """Constraint -> xgrammar.CompiledGrammar; a ConfigError when the vocabulary cannot even
        begin a text the constraint allows (e.g. a JSON schema for a char model that has never
        seen '{')."""
        compiled = self.compiler.compile_grammar(_parse(constraint.kind, constraint.spec))
        bitmask = self.xg.allocate_token_bitmask(1, self.vocab_size)
        self.xg.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask)
        if not bitmask.any():
            raise ConfigError(f"no token of this model's vocabulary can begin a text the "
                              f"{constraint.name} allows (the tokenizer lacks the characters "
                              "it starts with)")
        return compiled

    def matcher(self, compiled: Any) -> RowMatcher:
        return RowMatcher(self.xg.GrammarMatcher(compiled))


class RowMatcher:
    """One row's place in its constraint."""

    __slots__ = ("m",)

    def __init__(self, m: Any):
        self.m = m

    def advance(self, token: int) -> None:
        if not self.m.accept_token(token):  # the mask allowed it: cannot happen
            raise RuntimeError(f"the constraint refused token {token}, which its mask allowed")


class ConstraintMask:
    """The allowed-token bitmask of a batch's constrained rows, and its application."""

    def __init__(self, grammars: Grammars, rows: int):
        self.xg, self.vocab_size = grammars.xg, grammars.vocab_size
        self.bitmask = self.xg.allocate_token_bitmask(rows, self.vocab_size)
        self.batch = None  # a BatchGrammarMatcher, made when two rows are constrained at once

    def apply(self, logits: torch.Tensor, matchers: Sequence[RowMatcher | None]
              ) -> tuple[torch.Tensor, list[int]]:
        """logits (B, V) -> a float32 copy with the tokens row i's matcher does not allow at -inf
        (rows with None untouched), and the rows no token can continue (dead ends: the
        constraint needs a token the vocabulary lacks). A dead row's EOS is left finite so that
        sampling stays defined; the caller ends the row without taking it."""
        import torch

        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return logits, []
        if len(rows) == 1:
            matchers[rows[0]].m.fill_next_token_bitmask(self.bitmask, rows[0])
        else:
            if self.batch is None:
                self.batch = self.xg.BatchGrammarMatcher(max_threads=1)
            self.batch.batch_fill_next_token_bitmask([matchers[i].m for i in rows], self.bitmask,
                                                     rows)
        x = logits.to(torch.float32, copy=True)
        bitmask = self.bitmask.to(x.device, non_blocking=True)
        # xgrammar's C++ kernel on the CPU; elsewhere its plain-torch one, which runs on every
        # device (its CUDA and triton kernels are compiled at first use)
        backend = "cpu" if x.device.type == "cpu" else "torch_native"
        self.xg.apply_token_bitmask_inplace(x, bitmask, vocab_size=self.vocab_size, indices=rows,
                                            backend=backend)
        index = torch.tensor(rows, device=x.device)
        dead_mask = torch.isneginf(x[index]).all(dim=-1)
        if not dead_mask.any():
            return x, []
        dead = [rows[i] for i in dead_mask.nonzero().flatten().tolist()]
        x[dead] = 0.0  # any finite row: its token is never taken
        return x, dead
