"""Tokenizers: text <-> token ids, stored as JSON (`tokenizer.json`) in data and run directories.

Every tokenizer has BOS and EOS special tokens and exposes `token_bytes(id)`, the UTF-8 bytes a token
stands for, which lets the engine stream text without ever printing half a multi-byte character.
"""

from .base import Tokenizer, kinds, load_tokenizer, register, save_tokenizer, train_tokenizer
from .bpe import BPETokenizer
from .bytes import ByteTokenizer
from .char import CharTokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "Tokenizer",
    "kinds",
    "load_tokenizer",
    "register",
    "save_tokenizer",
    "train_tokenizer",
]
