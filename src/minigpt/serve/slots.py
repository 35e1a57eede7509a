"""Bounded generation slots for the server: worker threads, a waiting line, and cancellation.

Generation is synchronous PyTorch code, so it never runs on the event loop: each request becomes a
`Job` run by one of `max_concurrency` worker threads. Up to `max_queue` more jobs wait in line (FIFO);
beyond that, `submit` raises `ServerBusy` at once (the server answers 429) instead of letting
latency grow without bound. Cancelling a job (its client disconnected) takes it out of the line at
once if it is waiting; if it is generating, its thread stops between two tokens and only then
releases the slot, so the number of threads generating never exceeds the bound.

The worker thread hands results to the event loop through an asyncio queue
(`loop.call_soon_threadsafe`), so the async side awaits items without polling.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any


class ServerBusy(Exception):
    """Every slot is generating and the waiting line is full."""


_END = object()  # marks the end of a job's items


class JobFailed(Exception):
    """The worker raised; carries its exception to the async side."""


class Job:
    """One request's generation: a cancel flag for the worker, a queue of items for the server."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        work: Callable[[Job], None],
        on_cancel: Callable[[Job], None],
    ):
        self._loop = loop
        self.work = work
        self._on_cancel = on_cancel
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._ended = False

    # --- worker-thread side
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody will read
            self._cancelled.set()

    # --- event-loop side
    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._on_cancel(self)

    async def next_batch(self) -> list[Any] | None:
        """Wait for at least one item, then take all that are ready; None once the job has ended."""
        if self._ended:
            return None
        batch = [await self._items.get()]
        while not self._items.empty():
            batch.append(self._items.get_nowait())
        if batch[-1] is _END:
            self._ended = True
            batch.pop()
        for item in batch:
            if isinstance(item, JobFailed):
                raise item
        return batch or None


class Scheduler:
    """Runs `work(job)` callables on a fixed pool of threads, with a bounded FIFO waiting line."""

    def __init__(self, max_concurrency: int, max_queue: int):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("need max_concurrency >= 1 and max_queue >= 0")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._line: deque[Job] = deque()
        self._running = 0
        self._running_jobs: set[Job] = set()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"minigpt-generate-{i}", daemon=True)
            for i in range(max_concurrency)
        ]
        for t in self._threads:
            t.start()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._line)

    def submit(self, work: Callable[[Job], None]) -> Job:
        """Admit a job (or raise ServerBusy). Must be called from the event loop's thread."""
        job = Job(asyncio.get_running_loop(), work, on_cancel=self._withdraw)
        with self._cond:
            if self._closed:
                raise ServerBusy("the server is shutting down")
            if self._running + len(self._line) >= self.max_concurrency + self.max_queue:
                raise ServerBusy(
                    f"all {self.max_concurrency} generation slots are busy and "
                    f"{self.max_queue} requests are already waiting; retry later"
                )
            self._line.append(job)
            self._cond.notify()
        return job

    def _withdraw(self, job: Job) -> None:
        """A cancelled job that is still waiting leaves the line at once (its client is gone)."""
        with self._cond:
            try:
                self._line.remove(job)
            except ValueError:
                return  # already running: its thread stops at the next token
        job.put(_END)

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._line and not self._closed:
                    self._cond.wait()
                if not self._line:
                    return
                job = self._line.popleft()
                self._running += 1
                self._running_jobs.add(job)
            try:
                if not job.cancelled:
                    job.work(job)
            except Exception as e:  # every failure must reach the client, never kill the thread
                job.put(JobFailed(e))
            finally:
                with self._cond:
                    self._running -= 1
                    self._running_jobs.discard(job)
                job.put(_END)

    def close(self) -> None:
        """Stop: waiting jobs end without generating, running ones at their next token."""
        with self._cond:
            self._closed = True
            jobs = [*self._line, *self._running_jobs]
            self._cond.notify_all()
        for job in jobs:
            job.cancel()
