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
        """Add `text`; return what can be emitted now. After a stop is hit, returns "" forever."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        pending = self._held + text
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return pending[: min(hits)]
        keep = self._longest_stop_prefix_suffix(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """The stream ended without the held-back text becoming a stop string: release it."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        # Every position where a stop string could still start lies in this suffix, so holding it
        # back is enough: a stop string spanning already-emitted text is impossible.
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
