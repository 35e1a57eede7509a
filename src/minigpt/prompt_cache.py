"""Reusing the keys and values of text seen before: a request whose prompt starts like a recent
prompt (a system prompt, few-shot examples, a chat history with the model's own reply) copies those
positions instead of computing them again (llama.cpp's `--cache-prompt`, vLLM's prefix caching).

Exact by causality: a position's keys and values depend only on the tokens up to it, so the first
m positions of any sequence that starts with the same m tokens are the same numbers, up to the
rounding of the shapes they were computed in (docs/server.md, "Reproducibility").

Bounded: `capacity` entries, each one row of the model's context in a cache of their own, the least
recently used replaced first. An entry is a token sequence and its first `length` positions; a
lookup finds the entry sharing the longest prefix with a prompt. The batcher owns it (one thread).
"""

from __future__ import annotations

from collections.abc import Sequence

from .kv_cache import KVCache

MIN_REUSE = 16  # shorter shared prefixes (a BOS, a common first word) are cheaper to recompute


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class PromptCache:
    def __init__(self, model, capacity: int):
        self.capacity = capacity
        self.kv = KVCache.for_model(model, capacity)
        self.ids: list[list[int] | None] = [None] * capacity  # slot -> tokens whose keys it holds
        self.used = [0] * capacity  # slot -> when last stored or read (a counter)
        self.clock = 0
        self.hits = 0
        self.tokens_reused = 0

    def lookup(self, prompt: Sequence[int]) -> tuple[int, int]:
        """(slot, m): the entry sharing the longest prefix with `prompt`, at most all but its last
        token (whose logits the request needs from a forward); m = 0 when none shares MIN_REUSE."""
        best, best_m = -1, 0
        for slot, ids in enumerate(self.ids):
            if ids is not None:
                m = min(shared_prefix(ids, prompt), len(prompt) - 1)
                if m > best_m:
                    best, best_m = slot, m
        if best_m < MIN_REUSE:
            return -1, 0
        self.clock += 1
        self.used[best] = self.clock
        self.hits += 1
        self.tokens_reused += best_m
        return best, best_m

    def copy_into(self, slot: int, m: int, dst: KVCache, row: int) -> None:
        dst.copy_rows(self.kv, slot, row, m)

    def store(self, ids: Sequence[int], src: KVCache, row: int) -> None:
        """Keep the first len(ids) positions of `src`'s `row`, which hold `ids`. A sequence that an
        entry already covers is not stored twice; one that extends an entry replaces it."""
        if len(ids) < MIN_REUSE:
            return
        slot = None
        for s, held in enumerate(self.ids):
            if held is not None and shared_prefix(held, ids) == min(len(held), len(ids)):
                if len(held) >= len(ids):  # already covered
                    self.clock += 1
                    self.used[s] = self.clock
                    return
                slot = s  # the longer one replaces its prefix
                break
        if slot is None:
            slot = min(range(self.capacity), key=lambda s: (self.ids[s] is not None, self.used[s]))
        self.kv.copy_rows(src, row, slot, len(ids))
        self.ids[slot] = list(ids)
        self.clock += 1
        self.used[slot] = self.clock
