"""Look inside a model on a given text: per-token probability, surprise and alternatives, attention.

`Engine.inspect(text)` returns an `Inspection` of NumPy arrays. Token i of `tokens` is predicted
from tokens 0..i-1, so the first token of a text has no prediction (NaN) unless the model was
trained on documents, in which case the text starts after BOS and every character is scored.
Surprise is -log2 p in bits, from the same log-softmax the training loss uses: the mean surprise
times ln 2 is the model's cross-entropy (nats/token) on the text.

Tokens are shown as the text they cover. A byte token inside a multi-byte character covers part of
a character, so the text is also cut into `segments`: the smallest runs of characters and tokens
whose edges coincide (one character per char token, one token per BPE token, the 1-4 byte tokens of
one character). A segment's surprise is the sum over its tokens: the bits the model needed for it.
The HTML and PNG views of an Inspection are in tools/inspect_report.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import DataError

if TYPE_CHECKING:
    from .engine import Engine

LN2 = math.log(2)


@dataclass
class Segment:
    text: str  # the characters it covers
    first: int  # index of its first token in Inspection.tokens
    last: int  # index of its last token (inclusive)
    surprise: float  # bits, summed over its scored tokens (NaN if none was scored)


@dataclass
class Inspection:
    text: str
    tokens: list[int]  # ids the model read (BOS first for document models)
    pieces: list[str]  # text of each token; bytes of a partial character as \xNN
    prob: np.ndarray  # (T,) p(token i | tokens < i); NaN where nothing predicts it
    surprise: np.ndarray  # (T,) -log2 prob, bits
    top_ids: np.ndarray  # (T, k) the model's k likeliest tokens at position i, likeliest first
    top_probs: np.ndarray  # (T, k)
    top_pieces: list[list[str]]
    attention: np.ndarray  # (n_layer, n_head, T, T): row i weighs tokens 0..i
    segments: list[Segment]

    @property
    def scored(self) -> np.ndarray:
        """Boolean mask of the tokens that have a prediction."""
        return ~np.isnan(self.prob)

    @property
    def mean_surprise(self) -> float:
        """Bits per scored token; times ln 2 it is the cross-entropy loss on this text."""
        return float(self.surprise[self.scored].mean())

    def to_dict(self, digits: int = 5, attention_digits: int | None = None) -> dict[str, Any]:
        """JSON-ready form (NaN -> None, floats rounded): what the HTML page and the API use.

        The attention maps are most of the size (n_layer x n_head x T x T numbers); a page that
        only draws them can round them harder with `attention_digits`."""

        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), digits)

        return {
            "text": self.text, "tokens": self.tokens, "pieces": self.pieces,
            "prob": [num(p) for p in self.prob], "surprise": [num(s) for s in self.surprise],
            "top_ids": self.top_ids.tolist(), "top_pieces": self.top_pieces,
            "top_probs": [[num(p) for p in row] for row in self.top_probs],
            # float64 before rounding: a rounded float32 prints as 0.12300000339746475
            "attention": np.round(self.attention.astype(np.float64),
                                  attention_digits or digits).tolist(),
            "segments": [{"text": s.text, "first": s.first, "last": s.last,
                          "surprise": num(s.surprise)} for s in self.segments],
            "mean_surprise": num(self.mean_surprise),
        }


def token_ids(engine: Engine, text: str) -> list[int]:
    """The ids the model reads for `text`; one-line errors for texts it cannot inspect."""
    if not text:
        raise DataError("nothing to inspect: the text is empty")
    ids = engine.tokenizer.encode(text)  # unknown characters: TokenizerError names them
    if engine.bos_prompts:
        ids = [engine.tokenizer.bos_id, *ids]
    if len(ids) < 2:
        raise DataError("the text is one token; inspect needs two or more (the first one is only "
                        "read, never predicted)")
    if len(ids) > engine.block_size:
        raise DataError(f"the text is {len(ids)} tokens; this model reads at most "
                        f"{engine.block_size} (its block size): inspect a shorter text")
    return ids


@torch.inference_mode()
def inspect(engine: Engine, text: str, top_k: int = 5) -> Inspection:
    """Run the model once over `text` and keep what it saw: see the module docstring."""
    if top_k < 1:
        raise DataError(f"top-k must be >= 1, got {top_k}")
    ids = token_ids(engine, text)
    idx = torch.tensor([ids], device=engine.device)
    logits, _, attention = engine.model(idx, return_attention=True)
    # log-softmax in float32, as F.cross_entropy does: surprise is exactly the loss, in bits
    logp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, vocab): prediction for the next token
    T = len(ids)
    next_logp = logp[:-1].gather(1, idx[0, 1:, None].long())[:, 0]  # log p(token i+1 | ..i)
    prob = np.full(T, np.nan)
    prob[1:] = next_logp.exp().double().cpu().numpy()
    surprise = np.full(T, np.nan)
    surprise[1:] = (-next_logp / LN2).double().cpu().numpy()
    k = min(top_k, logp.size(-1))
    top_logp, top_ids = logp[:-1].topk(k, dim=-1)  # what it expected at each predicted position
    top_probs = np.full((T, k), np.nan)
    top_probs[1:] = top_logp.exp().double().cpu().numpy()
    top_id_rows = np.full((T, k), -1, dtype=np.int64)
    top_id_rows[1:] = top_ids.cpu().numpy()
    tok = engine.tokenizer
    pieces = [piece(tok, i) for i in ids]
    top_pieces = [[piece(tok, int(i)) if i >= 0 else "" for i in row] for row in top_id_rows]
    return Inspection(text, ids, pieces, prob, surprise, top_id_rows, top_probs, top_pieces,
                      attention[:, 0].float().cpu().numpy(), segments(tok, ids, text, surprise))


def piece(tokenizer: Any, token_id: int) -> str:
    """A token as the text it covers; specials by name; a partial character's bytes as \\xNN."""
    if token_id == tokenizer.bos_id:
        return "<|bos|>"
    if token_id == tokenizer.eos_id:
        return "<|eos|>"
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace")


def segments(tokenizer: Any, ids: list[int], text: str, surprise: np.ndarray) -> list[Segment]:
    """Cut `text` where a token edge meets a character edge (see the module docstring)."""
    # byte offset where a character starts -> its index (plus the end of the text)
    char_at = {int(b): i for i, b in enumerate(np.cumsum([0] + [len(c.encode()) for c in text]))}
    out: list[Segment] = []
    pos = chars = 0  # byte offset and character count consumed so far
    first = None
    for i, t in enumerate(ids):
        size = len(tokenizer.token_bytes(t))
        if size == 0:
            continue  # BOS and EOS cover no text
        first = i if first is None else first
        pos += size
        if pos in char_at:  # a character ends exactly here: close the segment
            bits = surprise[first : i + 1]
            total = float(np.nansum(bits)) if not np.isnan(bits).all() else math.nan
            out.append(Segment(text[chars : char_at[pos]], first, i, total))
            chars, first = char_at[pos], None
    return out
