"""The server's side of continuous batching: an HTTP request becomes a `Job`, one batcher request
per prompt on the server's one `batching.Batcher`.

Generation is synchronous PyTorch code, so it never runs on the event loop: the decoding thread
(`Batcher.run`) decodes every admitted request in one batch of `max_concurrency` rows. Up to
`max_queue` more requests wait in line (FIFO); beyond that, `submit_job` raises the batcher's `BatcherBusy` at once
(the server answers 429) instead of letting latency grow without bound. Cancelling a job (its
client disconnected) takes it out of the line at once if it is waiting, and frees its rows before
the next step if it is generating.

Results come back without a wake-up per token: the batcher calls a job's `notify` once, when the
job has new events and none was pending, which sets an asyncio.Event through
`loop.call_soon_threadsafe`; the job then takes every event ready by then. A client that reads
slower than the model writes gets several tokens per wake-up, merged into one chunk per choice.
And a job takes new text at most every `stream_interval` seconds (5 ms: far below what a reader
notices, while the model makes a token every ~0.5 ms for one user on a CPU): every wake-up of the
event loop costs Python work that holds the GIL the decoding thread needs, so one wake-up per token
would cost a single fast stream a third of its speed. The first text of a job is never delayed.

With `logprobs`, a job turns each event's scores (computed on the decoding thread) into
`logprobs.Scored` tokens with their character offsets; an echoed prompt's scores (`Engine.score`)
come first.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..batching import Batcher, BatcherBusy, BatchRequest
from ..errors import ConfigError
from ..sampling import SamplingParams
from ..tokenization import Tokenizer
from . import logprobs as lp
from .openai_api import APIError


def env_seconds(name: str, default: float | None) -> float | None:
    """A duration in seconds from the environment; a bad value is a one-line ConfigError."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a number of seconds >= 0, got {raw!r}")
    return value


class JobFailed(Exception):
    """Generation raised; carries its exception to the async side."""


@dataclass
class Delta:
    """New text of one choice; the last delta of a choice has its finish_reason and token count."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0
    scores: list[lp.Scored] = field(default_factory=list)  # with logprobs: the tokens of `text`


def merge_deltas(batch: list[Delta]) -> tuple[dict[int, tuple[str, str | None, list]], int]:
    """Deltas that were ready at once -> one (text, finish_reason, scores) per choice, and the
    completion tokens of the choices that finished: several tokens may be ready when the client
    reads slower than the model writes, and each choice gets one chunk for them, not one per token."""
    merged: dict[int, list[Any]] = {}
    tokens = 0
    for d in batch:
        entry = merged.setdefault(d.index, ["", None, []])
        entry[0] += d.text
        entry[2] += d.scores
        if d.finish_reason:
            entry[1] = d.finish_reason
            tokens += d.tokens
    return {i: (text, finish, scores) for i, (text, finish, scores) in merged.items()}, tokens


async def next_or_500(job: Job) -> list[Delta] | None:
    """The job's next batch of deltas; a failed generation is a 500 (the reply has not begun)."""
    try:
        return await job.next_batch()
    except JobFailed as e:
        raise APIError(500, f"generation failed: {e.args[0]}", type="server_error") from None


class Job:
    """One HTTP request's generation: one batcher request per prompt, choices numbered
    prompt * n + sample as in OpenAI's API.

    With logprobs, each event's scores become `Scored` tokens at the character offset where its
    text starts (after `bases[p]` characters of echoed prompt); the batcher has already cut text
    and scores at the stop strings. `echoed[p]`, the scored prompt, comes first in each choice."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, stream_interval: float,
                 tokenizer: Tokenizer | None = None, bases: Sequence[int] = (),
                 echoed: list[list[lp.Scored]] | None = None):
        self._loop = loop
        self.n = n
        self.tokenizer, self.bases = tokenizer, list(bases)
        self._chars: dict[int, int] = {}  # characters of each choice's text so far
        self._echoed = echoed
        self.timer: Any = None  # text() at the first text, end() at the end (the /metrics timer)
        self.stream_interval = stream_interval
        self._last_take: float | None = None
        self.requests: list[BatchRequest] = []
        self._wake = asyncio.Event()
        self._counts: dict[int, int] = {}
        self._ended = False

    def notify(self) -> None:
        """Called from the batcher thread: new events are ready."""
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody will read
            self.cancel()

    def cancel(self) -> None:
        for req in self.requests:
            req.cancel()

    @property
    def cancelled(self) -> bool:
        return any(req.cancelled for req in self.requests)

    def _take(self) -> tuple[list[Delta], bool]:
        deltas, ended = [], True
        if self._echoed is not None:
            deltas = [Delta(p * self.n + i, "", scores=list(scores))
                      for p, scores in enumerate(self._echoed) for i in range(self.n)]
            self._echoed = None
        for p, req in enumerate(self.requests):
            try:
                events, done = req.drain()
            except Exception as e:
                raise JobFailed(f"{type(e).__name__}: {e}") from e
            ended &= done
            for ev in events:
                i = p * self.n + ev.index
                count = self._counts[i] = self._counts.get(i, 0) + (ev.token is not None)
                scores = self._score(p, i, ev)
                if ev.text or ev.finish_reason or scores:
                    deltas.append(Delta(i, ev.text, ev.finish_reason, count, scores))
        return deltas, ended

    def _score(self, p: int, i: int, ev: Any) -> list[lp.Scored]:
        """The event's token as a `Scored` (none without logprobs, and none for the end-of-text
        token that finishes a choice: it adds no text)."""
        offset = self._chars.get(i, self.bases[p] if p < len(self.bases) else 0)
        self._chars[i] = offset + len(ev.text)
        tok = self.tokenizer
        if ev.logprob is None or tok is None or (ev.finish_reason == "stop"
                                                 and ev.token == tok.eos_id):
            return []
        return [lp.scored(tok, ev.token, ev.logprob, ev.top_logprobs or [], offset)]

    async def next_batch(self) -> list[Delta] | None:
        """Wait for new text, then take all that is ready; None once every choice has ended."""
        while not self._ended:
            if self._last_take is not None:  # pacing only: what is taken never depends on it
                wait = self._last_take + self.stream_interval - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            self._wake.clear()  # before taking: a notify after the take wakes the wait below
            deltas, self._ended = self._take()
            if deltas:
                self._last_take = self._loop.time()
                if self.timer is not None:
                    self.timer.text()
                return deltas
            if not self._ended:
                await self._wake.wait()
        if self.timer is not None:
            self.timer.end()
            self.timer = None
        return None


def submit_job(batcher: Batcher, prompt_ids: list[list[int]], params: SamplingParams,
               stream_interval: float, stop: Sequence[str] = (), bases: Sequence[int] = (),
               echoed: list[list[lp.Scored]] | None = None) -> Job:
    """A job of one batcher request per prompt, or BatcherBusy with none of them left queued.
    Must be called from the event loop's thread. `bases`/`echoed`: each prompt's echoed length
    and scored tokens (see `Job`)."""
    job = Job(asyncio.get_running_loop(), params.num_samples, stream_interval,
              batcher.engine.tokenizer, bases, echoed)
    try:
        for ids in prompt_ids:
            job.requests.append(batcher.submit(ids, params, stop=stop, notify=job.notify))
    except BatcherBusy:
        job.cancel()  # the prompts admitted before this one give their places back
        raise
    return job
