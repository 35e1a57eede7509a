"""Bits per byte: the loss on a scale that does not depend on the tokenizer.

Cross-entropy per token cannot compare a char model with a BPE model: a BPE token covers several
characters, so its loss is higher even when the model is better. Spread the loss over the text instead:
total nats over a split (mean loss per token x tokens) divided by the UTF-8 bytes of that text, in bits.
A lower value means the model compresses the same text better, whatever it was tokenized with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def bits_per_byte(loss: float, tokens: int, nbytes: int) -> float:
    """Mean loss in nats per token, over `tokens` tokens covering `nbytes` bytes -> bits per byte."""
    return loss * tokens / (math.log(2) * nbytes)


def split_bits_per_byte(loss: float, meta: Mapping[str, Any], split: str) -> float | None:
    """bits_per_byte for a split of prepared data (its meta.json counts); None if they are missing."""
    # conversations: the loss is over the learnt tokens only, and the bytes are theirs (prepare.py)
    tokens = meta.get(f"{split}_learnt_tokens") or meta.get(f"{split}_tokens")
    nbytes = meta.get(f"{split}_bytes")
    if not tokens or not nbytes:
        return None
    return bits_per_byte(loss, tokens, nbytes)
