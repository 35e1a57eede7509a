"""Stop strings for streamed text: cut a completion at the first stop string, never leaking part of one.

While streaming, text that could be the beginning of a stop string is held back until the following
text shows whether it really is one; the stop string itself is never returned (OpenAI semantics).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text pieces in order; get back the part that is safe to emit and whether a stop was hit."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self._held = ""  # a suffix of the text so far that is a prefix of some stop string
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add `text`; return what can be emitted now. After a stop is hit, returns "" forever.

        A stop string found is final only once no other stop could still begin before it: with
        stops "a" and "\naa", the text "\na" waits for the next piece, as cutting the whole text
        would cut at the earliest stop, "\naa", if it follows."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        pending = self._held + text
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        first = min(hits) if hits else len(pending)
        open_at = self._earliest_open_start(pending, first)
        if hits and open_at is None:
            self.stopped = True
            self._held = ""
            return pending[:first]
        cut = first if open_at is None else open_at
        self._held = pending[cut:]
        return pending[:cut]

    def flush(self) -> str:
        """The stream ended: release the held-back text, up to a stop string found in it."""
        held, self._held = self._held, ""
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return held[: min(hits)]
        return held

    def _earliest_open_start(self, text: str, before: int) -> int | None:
        """The first position before `before` where a stop string could still begin: the text
        from there on is a proper prefix of some stop. Held text never needs to reach further
        back, so a stop string spanning already-emitted text is impossible."""
        longest = max(len(s) for s in self.stops)
        for q in range(max(0, len(text) - longest + 1), before):
            rest = text[q:]
            if any(len(rest) < len(s) and s.startswith(rest) for s in self.stops):
                return q
        return None
