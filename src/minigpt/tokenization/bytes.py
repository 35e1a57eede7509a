"""Byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then BOS and EOS. Any text, no training."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import TokenizerError
from .base import BOS, EOS, register

_BYTES = [bytes([b]) for b in range(256)]


def utf8(text: str) -> bytes:
    """text.encode("utf-8"), with the one failure (lone surrogates) as a TokenizerError."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"text is not valid Unicode (lone surrogate at index {e.start})") from None


class ByteTokenizer:
    kind = "bytes"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None, **_: Any) -> ByteTokenizer:
        if vocab_size is not None:
            raise TokenizerError("--vocab-size applies to the bpe tokenizer only (bytes has 258 tokens)")
        for _text in texts:  # nothing to learn; the caller's pass still validates its input
            pass
        return cls()

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def bos_id(self) -> int:
        return 256

    @property
    def eos_id(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return list(utf8(text))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(utf8(t), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return _BYTES[token_id] if 0 <= token_id < 256 else b""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "bos": BOS, "eos": EOS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByteTokenizer:
        return cls()


register("bytes", ByteTokenizer.from_dict, ByteTokenizer.train)
