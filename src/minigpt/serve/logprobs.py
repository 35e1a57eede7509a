"""Log-probabilities on the wire: the engine's per-token scores as OpenAI's `logprobs` objects.

The numbers come from the engine (`StreamEvent.logprob` / `top_logprobs`, computed by
`sampling.token_logprobs`, in the batcher as in `Engine.stream`); this module only names tokens
and shapes the completions and chat forms. Where each token's text starts is counted in
`jobs.Job`; the tokens a stop string cut off the batcher has already dropped (`batching._cut`).

A token's name is its text when its bytes are whole UTF-8 characters, else OpenAI's
`bytes:\\xNN...` form (one byte of a multi-byte character from a byte-level model); special tokens are
named `<|bos|>` / `<|eos|>`. The end-of-text token that finishes a choice is not listed: it adds no
text (it is still counted in `usage`).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

from ..engine import Engine
from ..tokenization import Tokenizer
from ..tokenization.base import BOS, EOS


@dataclass
class Scored:
    """One token of a choice, with its log-probability and the most likely alternatives."""

    token: str
    data: bytes
    logprob: float | None
    top: list[tuple[str, bytes, float]]
    offset: int  # characters into the choice's text where this token's text starts


def name(tokenizer: Tokenizer, token_id: int) -> tuple[str, bytes]:
    """A token's display name and its bytes."""
    if token_id == tokenizer.bos_id:
        return BOS, b""
    if token_id == tokenizer.eos_id:
        return EOS, b""
    data = tokenizer.token_bytes(token_id)
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data), data


def scored(tokenizer: Tokenizer, token_id: int, logprob: float | None,
           top: list[tuple[int, float]], offset: int) -> Scored:
    alternatives = [(*name(tokenizer, t), lp) for t, lp in top]
    return Scored(*name(tokenizer, token_id), logprob, alternatives, offset)


def prompt_scores(engine: Engine, ids: list[int], k: int, keep_bos: bool = False) -> list[Scored]:
    """The prompt's tokens scored by the model (`Engine.score`); a BOS the server added to a
    text prompt is left out (it is no text), one the client sent as a token id is kept."""
    tok = engine.tokenizer
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, offset = [], 0
    for token_id, (logprob, top) in zip(ids, engine.score(ids, k)):
        if token_id == tok.bos_id and not keep_bos:
            continue
        out.append(scored(tok, token_id, logprob, top, offset))
        offset += len(decoder.decode(tok.token_bytes(token_id)))
    return out


def completion_logprobs(tokens: list[Scored]) -> dict[str, Any]:
    """The legacy Completions form (offsets count an echoed prompt)."""
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{n: lp for n, _, lp in t.top} if t.logprob is not None else None
                         for t in tokens],
        "text_offset": [t.offset for t in tokens],
    }


def chat_logprobs(tokens: list[Scored]) -> dict[str, Any]:
    """The Chat Completions form: `content` is one entry per token, alternatives included."""
    return {
        "content": [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.data),
             "top_logprobs": [{"token": n, "logprob": lp, "bytes": list(b)} for n, b, lp in t.top]}
            for t in tokens
        ],
        "refusal": None,
    }
