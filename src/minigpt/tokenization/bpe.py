"""Byte-level BPE trained on the user's corpus with Hugging Face `tokenizers` (Rust, parallel).

Like GPT-2's tokenizer: text is split into words by a regex, each word's UTF-8 bytes are the starting
symbols, and the most frequent adjacent pairs are merged until the vocabulary is full. Every byte is
in the base alphabet, so any Unicode text encodes and nothing is ever "unknown". BOS and EOS are
special tokens (ids 0 and 1); text that happens to contain "<|bos|>" is encoded as plain text.
A tokenizer imported from GPT-2 (interop/hf_import.py) keeps its own vocabulary and uses
`<|endoftext|>` as both BOS and EOS; tokenizer.json records which tokens those are.

tokenizer.json stores the Hugging Face tokenizer's own JSON under "hf" (never a pickle), so the file
also loads in `tokenizers.Tokenizer.from_str(json.dumps(d["hf"]))`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..errors import TokenizerError
from .base import BOS, EOS, register

DEFAULT_VOCAB_SIZE = 1024
MIN_VOCAB_SIZE = 258  # the 256 byte values + BOS + EOS
MAX_VOCAB_SIZE = 1 << 20


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes (what byte-level token strings are made of)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            stand_ins.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, stand_ins)}


_BYTE_OF = _byte_decoder()


def byte_stand_ins() -> list[str]:
    """GPT-2's printable stand-in of each byte value, indexed by the byte."""
    stand_in = {b: c for c, b in _BYTE_OF.items()}
    return [stand_in[b] for b in range(256)]


class BPETokenizer:
    kind = "bpe"

    def __init__(self, hf: HFTokenizer, hf_dict: dict[str, Any], bos: str = BOS, eos: str = EOS):
        self.hf = hf
        self.hf_dict = hf_dict  # kept as loaded, so a run's tokenizer.json compares equal to its data's
        self.hf.encode_special_tokens = True  # "<|bos|>" typed in the text is text, not BOS
        vocab = hf.get_vocab(with_added_tokens=True)
        n = len(vocab)
        if sorted(vocab.values()) != list(range(n)):
            raise TokenizerError("bpe tokenizer ids are not contiguous")
        specials = {t.content for t in hf.get_added_tokens_decoder().values()}
        if bos not in specials or eos not in specials:
            raise TokenizerError(f"bpe tokenizer lacks the {bos} / {eos} special tokens")
        self.bos_token, self.eos_token = bos, eos
        self._bos, self._eos = vocab[bos], vocab[eos]
        self._bytes = [b""] * n
        for token, i in vocab.items():
            if token not in specials:
                try:
                    self._bytes[i] = bytes(_BYTE_OF[c] for c in token)
                except KeyError:
                    raise TokenizerError(f"bpe token {token!r} is not byte-level") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None, **_: Any) -> BPETokenizer:
        """Learn merges from the texts, deterministically. Only word counts are kept, but the Rust side
        reads ahead up to 256 texts, so pass pieces of a large corpus, not whole files."""
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
            raise TokenizerError(f"bpe vocab-size must be between {MIN_VOCAB_SIZE} (256 bytes + BOS + "
                                 f"EOS) and {MAX_VOCAB_SIZE}, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        # No normalizer: text must round-trip byte for byte.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, json.loads(hf.to_str()))

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self._hf_call(lambda: self.hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._hf_call(lambda: self.hf.encode_batch_fast(list(texts), add_special_tokens=False))
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    @staticmethod
    def _hf_call(fn):
        try:
            return fn()
        except (UnicodeEncodeError, TypeError) as e:  # lone surrogates cannot cross into Rust
            raise TokenizerError(f"text is not valid Unicode: {e}") from None

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self._bytes)
        return b"".join(self._bytes[i] for i in ids if 0 <= i < n).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "bos": self.bos_token, "eos": self.eos_token, "hf": self.hf_dict}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        try:
            hf = HFTokenizer.from_str(json.dumps(d["hf"]))
        except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
            raise TokenizerError(f"bpe tokenizer data is malformed: {str(e)[:200]}") from None
        return cls(hf, d["hf"], d.get("bos", BOS), d.get("eos", EOS))


register("bpe", BPETokenizer.from_dict, BPETokenizer.train)
