"""Keeping byte-level output valid UTF-8: which tokens may come next, given the bytes so far.

A `bytes` or `bpe` model samples bytes, and nothing stops it from sampling a continuation byte with
no lead byte before it, or a new character while one is half-written; the decoder then prints
U+FFFD. `Utf8Mask` is a strict UTF-8 decoder run ahead of sampling: for each stream it knows what
the next byte may be (any character start, or a continuation in a given range), and it masks every
token whose bytes would break that, and the special tokens (end-of-text) while a character is
unfinished. The ranges are those of RFC 3629 (no overlong forms, no surrogates, nothing above
U+10FFFF), so the output always decodes with `bytes.decode("utf-8")` in strict mode.

A state is (continuation bytes still needed, lowest and highest allowed next byte); there are
eight, so the mask of every token in every state is computed once per tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

State = tuple[int, int, int]  # (continuation bytes needed, lo, hi of the next byte)
START: State = (0, 0, 0)
_CONT = (0x80, 0xBF)
# lead byte -> (continuation bytes, range of the first one); RFC 3629's table
_LEADS: dict[int, tuple[int, int, int]] = {
    **{b: (1, *_CONT) for b in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF), **{b: (2, *_CONT) for b in range(0xE1, 0xED)},
    0xED: (2, 0x80, 0x9F), **{b: (2, *_CONT) for b in range(0xEE, 0xF0)},
    0xF0: (3, 0x90, 0xBF), **{b: (3, *_CONT) for b in range(0xF1, 0xF4)},
    0xF4: (3, 0x80, 0x8F),
}
STATES: list[State] = [START, *sorted({(n, lo, hi) for n, lo, hi in _LEADS.values()}
                                      | {(n, *_CONT) for n in (1, 2)})]


def step(state: State, data: bytes) -> State | None:
    """The state after `data`, or None if `data` is not a valid continuation of `state`."""
    need, lo, hi = state
    for b in data:
        if need:
            if not lo <= b <= hi:
                return None
            need, lo, hi = need - 1, *_CONT
        elif b < 0x80:
            continue
        elif b in _LEADS:
            need, lo, hi = _LEADS[b]
        else:
            return None  # a continuation byte without a lead, or a byte UTF-8 never uses
    return (need, lo, hi) if need else START


class Utf8Table:
    """Which tokens each state allows, for one tokenizer: built once (the engine keeps it)."""

    def __init__(self, token_bytes: list[bytes], eos_id: int | None):
        self.token_bytes = token_bytes
        allowed = torch.zeros(len(STATES), len(token_bytes), dtype=torch.bool)
        for s, state in enumerate(STATES):
            for t, data in enumerate(token_bytes):
                # a special token (no bytes) mid-character: EOS would leave half a character, BOS
                # would start a document inside one
                allowed[s, t] = step(state, data) is not None and (bool(data) or state == START)
            if eos_id is not None and state != START:
                allowed[s, eos_id] = False
        self.allowed = allowed
        self.index = {state: i for i, state in enumerate(STATES)}
        self.start_allows_all = bool(allowed[0].all())
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer) -> Utf8Table:
        return cls([tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)],
                   tokenizer.eos_id)

    def mask(self, logits: torch.Tensor, states: Sequence[State | None]) -> torch.Tensor:
        """logits (B, V) with every token that would break row i's UTF-8 (its state states[i];
        None: the row is not masked) set to -inf."""
        masked = [i for i, state in enumerate(states) if state is not None]
        index = [self.index[states[i]] for i in masked]
        if not masked or (self.start_allows_all and not any(index)):
            return logits  # e.g. a char tokenizer between characters: nothing to mask
        table = self._on_device.get(logits.device)
        if table is None:
            table = self._on_device[logits.device] = self.allowed.to(logits.device)
        allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        allowed[torch.tensor(masked, device=logits.device)] = table[
            torch.tensor(index, device=logits.device)]
        return logits.masked_fill(~allowed, float("-inf"))


class Utf8Mask:
    """Per-stream UTF-8 states for a batch, and the (B, V) mask of tokens each stream may take."""

    def __init__(self, table: Utf8Table, rows: int):
        self.table = table
        self.states: list[State] = [START] * rows

    @classmethod
    def for_tokenizer(cls, tokenizer, rows: int) -> Utf8Mask:
        return cls(Utf8Table.for_tokenizer(tokenizer), rows)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) with every token that would break UTF-8 set to -inf."""
        return self.table.mask(logits, self.states)

    def advance(self, tokens: list[int]) -> None:
        """Record the token each stream took (a masked one cannot come, so it always steps)."""
        for i, tok in enumerate(tokens):
            self.states[i] = step(self.states[i], self.table.token_bytes[tok]) or START
