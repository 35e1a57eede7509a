"""Character-level tokenizer: one id per distinct character of the corpus, then BOS and EOS."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import TokenizerError
from .base import register


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        if len(self.stoi) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise TokenizerError("char tokenizer needs distinct single characters")
        self._bytes = [c.encode("utf-8") for c in self.chars]
        # Vectorised encoding for `prepare`: code points sorted, with the id each one maps to.
        codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        order = np.argsort(codepoints, kind="stable")
        self._sorted_codepoints, self._sorted_ids = codepoints[order], order.astype(np.uint32)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None, **_: Any) -> CharTokenizer:
        """One pass over the texts (an iterator is fine: only the set of characters is kept)."""
        if vocab_size is not None:
            raise TokenizerError("--vocab-size applies to the bpe tokenizer only "
                                 "(a char vocabulary is the corpus's distinct characters)")
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls(sorted(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2

    @property
    def bos_id(self) -> int:
        return len(self.chars)

    @property
    def eos_id(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            shown = ", ".join(repr(c) for c in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise TokenizerError(
                f"text contains {len(unknown)} character(s) the tokenizer has never seen: {shown}{more}"
            ) from None

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            try:
                cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            except UnicodeEncodeError:
                cps = None
            if cps is None or not len(self.chars):
                out.append(np.asarray(self.encode(text), dtype=np.uint32))  # raises the clear error
                continue
            pos = np.minimum(np.searchsorted(self._sorted_codepoints, cps), len(self.chars) - 1)
            if not np.array_equal(self._sorted_codepoints[pos], cps):
                self.encode(text)  # raises, naming the unknown characters
            out.append(self._sorted_ids[pos])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in ids if 0 <= i < n)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self.chars) else b""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "chars": self.chars, "bos": "<|bos|>", "eos": "<|eos|>"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        return cls(d["chars"])


register("char", CharTokenizer.from_dict, CharTokenizer.train)
