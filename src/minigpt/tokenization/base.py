"""The tokenizer protocol, the JSON file format and the registry of tokenizer kinds."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import TokenizerError
from ..fsio import atomic_write_text

BOS = "<|bos|>"
EOS = "<|eos|>"


@runtime_checkable
class Tokenizer(Protocol):
    kind: str  # "char", "bytes", "bpe": the "type" field of tokenizer.json

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without BOS/EOS. Raises TokenizerError for text it cannot represent."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Many texts -> one unsigned integer id array each: the fast path `prepare` uses."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; special tokens are dropped."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes this token stands for (b"" for specials)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; must contain "type": kind."""
        ...


# kind -> (from_dict, train(texts, **options)); `texts` may be a one-pass iterator over a large corpus,
# and options a kind does not take (e.g. vocab_size for char) are refused with a TokenizerError.
_REGISTRY: dict[str, tuple[Callable[[dict], Tokenizer], Callable[..., Tokenizer]]] = {}


def register(kind: str, from_dict: Callable[[dict], Tokenizer], train: Callable[..., Tokenizer]):
    _REGISTRY[kind] = (from_dict, train)


def kinds() -> list[str]:
    return sorted(_REGISTRY)


def train_tokenizer(kind: str, texts: Iterable[str], **options: Any) -> Tokenizer:
    """Build a tokenizer of the given kind from the corpus texts (consumed once, in order)."""
    if kind not in _REGISTRY:
        raise TokenizerError(f"unknown tokenizer {kind!r}; choose from {', '.join(kinds())}")
    return _REGISTRY[kind][1](texts, **options)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in _REGISTRY:
        raise TokenizerError(f"unknown tokenizer type {kind!r} in tokenizer.json")
    return _REGISTRY[kind][0](d)


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    atomic_write_text(Path(path), json.dumps(tok.to_dict(), ensure_ascii=False) + "\n")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"tokenizer file {path} is not valid JSON: {e}") from None
    try:
        return tokenizer_from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise TokenizerError(f"tokenizer file {path} is malformed: {e}") from None
