"""A submitted request's events as its reader sees them: the StreamEvents a decoder writes, buffered
until the reader drains them, with one wake-up per batch of events.

`batching.BatchRequest` (a request on a batcher in this process) and
`serve.engine_process.RemoteRequest` (its stand-in on the HTTP side of the engine process) are
both an `EventBuffer`; the decoder side calls `_emit`, the reader `drain()` or iterates. Torch-free,
so that the HTTP side can hold requests before it imports torch.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass
class StreamEvent:
    index: int  # which of the request's num_samples samples
    text: str  # newly decodable text ("" while a multi-byte character is incomplete)
    token: int | None
    finish_reason: str | None = None  # "stop" (EOS, stop string) or "length" on a sample's last event
    # with SamplingParams.logprobs: the token's log-probability in the distribution it was sampled
    # from (sampling.distribution), and the most likely tokens as (id, logprob), descending
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class EventBuffer:
    """Events of one request with `n` samples: written by one decoding thread, read by any one
    other thread; `cancel()` from anywhere calls `on_cancel` once."""

    def __init__(self, n: int, notify: Callable[[], None] | None,
                 on_cancel: Callable[[EventBuffer], None]):
        self.n = n
        self._notify, self._on_cancel = notify, on_cancel
        self._cond = threading.Condition()
        self._events: deque[StreamEvent] = deque()
        self._signalled = False  # notify once until the reader drains: one wake-up, many events
        self.cancelled = False
        self.done = False
        self.error: BaseException | None = None

    # --- reader side
    def cancel(self) -> None:
        """Stop generating: the rows are freed before the next step (a waiting request leaves the
        line at once)."""
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel(self)

    def drain(self) -> tuple[list[StreamEvent], bool]:
        """The events so far and whether the request has ended; raises the decoder's error (once
        the events before it are taken)."""
        with self._cond:
            events, self._signalled = list(self._events), False
            self._events.clear()
            done, error = self.done, self.error
        if error is not None and not events:
            raise error
        return events, done and error is None

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            while True:
                with self._cond:
                    while not self._events and not self.done:
                        self._cond.wait()
                events, done = self.drain()
                yield from events
                if done:
                    return
        finally:
            if not self.done:
                self.cancel()

    # --- decoder side
    def _emit(self, events: list[StreamEvent], done: bool = False,
              error: BaseException | None = None) -> None:
        with self._cond:
            self._events.extend(events)
            self.done = self.done or done
            self.error = self.error or error
            signal = not self._signalled
            self._signalled = True
            self._cond.notify_all()
        if signal and self._notify is not None:
            self._notify()
