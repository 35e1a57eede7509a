"""Character-level tokenizer: one id per distinct character of the corpus, then BOS and EOS."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

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

    @classmethod
    def train(cls, texts: Sequence[str], **_: Any) -> CharTokenizer:
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
