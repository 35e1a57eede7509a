"""Continuous batching: many requests decoded together in one batch that they join and leave at any
token boundary.

    batcher = Batcher(minigpt.load("runs/x"), max_rows=32)
    req = batcher.submit("ROMEO:", max_new_tokens=50, seed=1)     # returns at once
    for event in req: print(event.text, end="")                   # StreamEvents, as Engine.stream
    batcher.close()

One thread (the batcher's) owns the model and the batch; `submit` hands it a request through a
lock-protected line, and events come back through each request's own lock-protected buffer, which a
reader drains (blocking iteration, or `drain()` after a `notify` callback: the server's way).

Each step: requests waiting in line join while rows are free (a request takes n rows); prompts are
prefilled, up to `prefill_chunk` tokens per step so a long prompt does not stall the running rows,
into a one-row scratch cache, with logits for the last position only; a finished prefill is copied
into its n rows (one prefill for n samples). Then every row decodes one token in one `DecodeStep.rows`
call, each at its own position. A row leaves at EOS, a stop string, its max_new_tokens or its
request's cancellation, and its row is reused at once (the last row moves into the hole, so the
batch stays rows 0..b-1). A row that fills the context window is rebuilt from its last 3/4 window
exactly as `Engine` does (`engine.py`).

Per row, as `Engine.stream`: the UTF-8 mask (`utf8.Utf8Mask`, one per row, from the engine's table)
applied to the logits before choosing, and with `logprobs` the token's log-probability and top k
from `sampling.token_logprobs` on those same logits. With stop strings, a row's events wait while
the matcher holds their text back and leave with the text it lets through (`_cut`), so text and
logprobs are cut at the same place.

Each request has its own torch.Generator, seeded as Engine seeds one, and draws its uniforms for all
of its n rows every step (also for rows that already left), so its random numbers never depend on
the other requests in the batch. What batching can change is rounding: see docs/server.md,
"Reproducibility".
"""

from __future__ import annotations

import codecs
import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .decode import DecodeStep, prefill
from .engine import Engine, Prompt, StreamEvent
from .errors import ConfigError
from .kv_cache import KVCache
from .sampling import SamplingParams, choose_tokens, token_logprobs, uniforms
from .stop_strings import StopMatcher
from .utf8 import Utf8Mask


class BatcherBusy(Exception):
    """Every row is taken and the waiting line is full (or the batcher is closed)."""


class BatchRequest:
    """One submitted prompt with its n samples: iterate it for StreamEvents, or `drain()` them.

    Written by the batcher thread, read by any one other thread; `cancel()` from anywhere."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop: Sequence[str],
                 notify: Callable[[], None] | None, device: torch.device,
                 on_cancel: Callable[[BatchRequest], None]):
        self.prompt_ids, self.params, self.stop = prompt_ids, params, tuple(stop)
        self._on_cancel = on_cancel
        self.n = params.num_samples
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self._notify = notify
        self._cond = threading.Condition()
        self._events: deque[StreamEvent] = deque()
        self._signalled = False  # notify once until the reader drains: one wake-up, many events
        self.cancelled = False
        self.done = False
        self.error: BaseException | None = None
        self.live = 0  # rows still generating (batcher thread only)
        self.fed = 0  # prompt tokens prefilled so far (batcher thread only)

    # --- reader side
    def cancel(self) -> None:
        """Stop generating: the rows are freed before the next step (a waiting request leaves the
        line at once)."""
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel(self)

    def drain(self) -> tuple[list[StreamEvent], bool]:
        """The events so far and whether the request has ended; raises the batcher's error."""
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

    # --- batcher side
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


class _Row:
    """One sequence in the batch: its tokens so far, its cache length, its text decoding, its
    UTF-8 mask state and its events held back by a stop string."""

    __slots__ = ("req", "index", "tokens", "length", "decoder", "stop", "count", "mask",
                 "held", "produced", "through")

    def __init__(self, req: BatchRequest, index: int, tokens: list[int], length: int,
                 mask: Utf8Mask | None):
        self.req, self.index, self.tokens, self.length = req, index, tokens, length
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = StopMatcher(req.stop) if req.stop else None
        self.count = 0  # tokens generated
        self.mask = mask  # this row's own Utf8Mask (one row), None when not masking
        # with stop strings: events whose text the matcher still holds back, with where their
        # text starts; characters produced, and characters the matcher let through
        self.held: deque[tuple[int, StreamEvent]] = deque()
        self.produced = self.through = 0


class Batcher:
    """A thread decoding every admitted request in one batch of up to `max_rows` rows."""

    def __init__(self, engine: Engine, max_rows: int = 32, max_queue: int = 64,
                 prefill_chunk: int = 64, start: bool = True):
        """`start=False`: no thread; the caller runs `step()` itself (tests use it to decide at
        which step each request joins)."""
        for name, value, lo in (("max-rows", max_rows, 1), ("max-queue", max_queue, 0),
                                ("prefill-chunk", prefill_chunk, 1)):
            if value < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {value}")
        self.engine, self.model = engine, engine.model
        self.max_rows, self.max_queue, self.prefill_chunk = max_rows, max_queue, prefill_chunk
        T = self.block_size = engine.block_size
        self.keep = max(1, T - T // 4)
        self.cache = KVCache.for_model(self.model, max_rows)
        self.scratch = KVCache.for_model(self.model, 1)  # one prompt at a time is prefilled here
        self.decode = DecodeStep(self.model)
        self._allowed: torch.Tensor | None = None  # the UTF-8 table on the device, made on first use
        self.rows: list[_Row] = []  # rows[s] lives in cache row s
        self._line: deque[BatchRequest] = deque()  # submitted, not yet holding rows
        self._prefilling: deque[BatchRequest] = deque()  # holding rows, prompt not yet prefilled
        self._active: set[BatchRequest] = set()  # holding rows
        self._reserved = 0  # rows held by _prefilling and _active requests
        self._lock = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run, and rows decoded over them: mean occupancy
        self.row_steps = 0
        self.tokens_generated = 0
        self.prompt_tokens_prefilled = 0
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._run, name="minigpt-batcher", daemon=True)
            self._thread.start()

    # ---- any thread --------------------------------------------------------------------------

    def submit(self, prompt: Prompt = "", params: SamplingParams | None = None, *,
               stop: Sequence[str] = (), notify: Callable[[], None] | None = None,
               **settings: Any) -> BatchRequest:
        """Queue a request (settings as Engine.stream); raises BatcherBusy when the line is full.

        `notify` is called from the batcher thread when new events are ready (once until they are
        drained): the server uses it to wake its event loop."""
        params = (params or SamplingParams()).replace(**settings)
        if params.num_samples > self.max_rows:
            raise ConfigError(f"{params.num_samples} samples need more rows than the batch has "
                              f"({self.max_rows})")
        if any(not s for s in stop):
            raise ConfigError("stop strings must be non-empty")
        ids = self.engine.encode_prompt(prompt)[-self.block_size:]
        if not ids:
            raise ConfigError("the prompt has no tokens (pass text, or at least one token id)")
        req = BatchRequest(ids, params, stop, notify, self.engine.device, self._withdraw)
        with self._lock:
            if self._closed:
                raise BatcherBusy("the batcher is closed")
            if self._queued(extra=req) > self.max_queue:
                raise BatcherBusy(f"all {self.max_rows} rows are busy and {self.max_queue} "
                                  "requests are already waiting; retry later")
            self._line.append(req)
            self._lock.notify()
        return req

    def _queued(self, extra: BatchRequest | None = None) -> int:
        """Requests in line that will not get rows at the next step (line order; lock held)."""
        free = self.max_rows - self._reserved
        line = [*self._line, extra] if extra is not None else self._line
        for i, req in enumerate(line):
            if req.n > free:
                return len(line) - i
            free -= req.n
        return 0

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._queued()

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._active) + len(self._prefilling) + len(self._line) - self._queued()

    @property
    def rows_in_use(self) -> int:
        return self._reserved

    def _withdraw(self, req: BatchRequest) -> None:
        with self._lock:
            try:
                self._line.remove(req)
            except ValueError:
                self._lock.notify()  # holding rows: the batcher frees them at its next step
                return
        req._emit([], done=True)

    def close(self) -> None:
        """Stop the thread; every request not yet finished ends (as if cancelled)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(30)
        else:
            self._fail_all(None)

    @torch.inference_mode()
    def step(self) -> None:
        """One step by hand (a batcher made with start=False): admit, decode, prefill."""
        with self._lock:
            self._admit()
        self._step_or_fail()

    # ---- the batcher thread ------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._closed and not self._line and not self._reserved:
                        self._lock.wait()
                    if self._closed:
                        break
                    self._admit()
                self._step_or_fail()
        self._fail_all(None)

    def _step_or_fail(self) -> None:
        try:
            self._step()
        except Exception as e:  # fail the requests in the batch, keep serving the ones to come
            self._fail_all(e)

    def _admit(self) -> None:
        """Line -> rows, first come first served (lock held)."""
        while self._line and self._line[0].n <= self.max_rows - self._reserved:
            req = self._line.popleft()
            self._reserved += req.n
            self._prefilling.append(req)

    def _fail_all(self, error: BaseException | None) -> None:
        with self._lock:
            reqs = {*self._active, *self._prefilling, *(self._line if error is None else ())}
            self._active.clear()
            self._prefilling.clear()
            if error is None:
                self._line.clear()
            self.rows.clear()
            self._reserved = 0
            self.scratch.reset()
        for req in reqs:
            req._emit([], done=True, error=error)

    def _step(self) -> None:
        self._drop_cancelled()
        if self.rows:
            self._decode_rows()
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            budget -= self._prefill_some(self._prefilling[0], budget)

    def _drop_cancelled(self) -> None:
        for s in range(len(self.rows) - 1, -1, -1):
            if self.rows[s].req.cancelled:
                self._remove_row(s)
        for req in [r for r in (*self._active, *self._prefilling) if r.cancelled]:
            if self._prefilling and req is self._prefilling[0]:
                self.scratch.reset()  # its prompt was half prefilled
            self._release(req)

    def _release(self, req: BatchRequest) -> None:
        """Give a request's rows back (its rows have already left the batch)."""
        with self._lock:
            if req in self._active:
                self._active.discard(req)
                self._reserved -= req.n
            elif req in self._prefilling:
                self._prefilling.remove(req)
                self._reserved -= req.n
        req._emit([], done=True)

    def _remove_row(self, s: int) -> None:
        row, last = self.rows[s], self.rows.pop()
        if last is not row:  # keep rows 0..b-1 dense: the last row moves into the hole
            self.cache.copy_rows(self.cache, len(self.rows), s, last.length)
            self.rows[s] = last
        row.req.live -= 1

    def _prefill_some(self, req: BatchRequest, budget: int) -> int:
        """Prefill up to `budget` tokens of the head request's prompt; when done, give it rows."""
        ids = req.prompt_ids
        start = req.fed
        take = min(budget, len(ids) - start)
        chunk = torch.tensor([ids[start : start + take]], dtype=torch.long,
                             device=self.engine.device)
        last = start + take == len(ids)
        logits = prefill(self.model, chunk, self.scratch, logits=last)
        req.fed += take
        self.prompt_tokens_prefilled += take
        if last:
            self._prefilling.popleft()
            self._join(req, logits)
            self.scratch.reset()
        return take

    def _join(self, req: BatchRequest, logits: torch.Tensor) -> None:
        """The prompt is in the scratch cache: copy it into n rows and choose their first tokens."""
        rows = []
        masking = self.engine.utf8_masking(req.params)
        for i in range(req.n):
            self.cache.copy_rows(self.scratch, 0, len(self.rows), self.scratch.pos)
            mask = Utf8Mask(self.engine.utf8_table, 1) if masking else None  # states only: CPU
            row = _Row(req, i, list(req.prompt_ids), self.scratch.pos, mask)
            self.rows.append(row)
            rows.append(row)
        req.live = req.n
        with self._lock:
            self._active.add(req)
        self._choose(logits.expand(req.n, -1), rows)

    def _decode_rows(self) -> None:
        for s, row in enumerate(self.rows):
            if row.length == self.block_size:  # window full: rebuild as Engine.generate_ids does
                view = self.cache.rows(s)
                if self.keep > 1:
                    ids = torch.tensor([row.tokens[-self.keep : -1]], device=self.engine.device)
                    prefill(self.model, ids, view, logits=False)
                row.length = view.pos
        rows = list(self.rows)
        tokens = torch.tensor([r.tokens[-1] for r in rows], device=self.engine.device)
        logits = self.decode.rows(tokens, [r.length for r in rows], self.cache)
        for r in rows:
            r.length += 1
        self.steps += 1
        self.row_steps += len(rows)
        self._choose(logits, rows)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Next token of every row (logits[i] is rows[i]'s), all through `choose_tokens`: one call
        per set of sampling settings, each request's uniforms from its own generator. Rows with a
        UTF-8 mask choose from masked logits, and logprobs come from those same logits."""
        logits = self._masked(logits, rows)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            p = r.req.params
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        chosen = [0] * len(rows)
        scores: list[tuple[float | None, list | None]] = [(None, None)] * len(rows)
        for (temperature, top_k, top_p), idx in groups.items():
            u = None if temperature == 0 else self._uniforms([rows[i] for i in idx])
            sub = logits if len(idx) == len(rows) else logits[torch.tensor(idx)]
            tokens = choose_tokens(sub, temperature, top_k, top_p, u)
            for i, tok in zip(idx, tokens.tolist()):
                chosen[i] = tok
            scored = [j for j, i in enumerate(idx) if rows[i].req.params.logprobs is not None]
            if scored:
                k = max(rows[idx[j]].req.params.logprobs for j in scored)
                pick = torch.tensor(scored, device=sub.device)
                s = token_logprobs(sub[pick], tokens[pick], k, temperature, top_k, top_p)
                for j, lp, vals, ids in zip(scored, s.logprob.tolist(), s.top_logprobs.tolist(),
                                            s.top_ids.tolist()):
                    # as Engine: a token filtered out (-inf) is no alternative
                    top = list(zip(ids, vals))[: rows[idx[j]].req.params.logprobs]
                    scores[idx[j]] = (lp, [(t, v) for t, v in top if v != float("-inf")])
        self._advance(rows, chosen, scores)

    def _masked(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """logits with each masked row's tokens that would break its UTF-8 set to -inf."""
        masked = [i for i, r in enumerate(rows) if r.mask is not None]
        if not masked:
            return logits
        table = self.engine.utf8_table
        states = [table.index[rows[i].mask.states[0]] for i in masked]
        if table.start_allows_all and not any(states):
            return logits  # every masked row is between characters and nothing is disallowed there
        if self._allowed is None:
            self._allowed = table.allowed.to(logits.device)
        allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        allowed[torch.tensor(masked, device=logits.device)] = self._allowed[
            torch.tensor(states, device=logits.device)]
        return logits.masked_fill(~allowed, float("-inf"))

    def _uniforms(self, rows: list[_Row]) -> torch.Tensor:
        """Every request draws for all n of its rows (as Engine does), then keeps its live ones."""
        req = rows[0].req
        if req.live == req.n == len(rows) and all(r.req is req and r.index == i
                                                  for i, r in enumerate(rows)):
            return uniforms(req.generator, req.n, self.engine.device)  # the common case alone
        drawn: dict[BatchRequest, torch.Tensor] = {}
        for r in rows:
            if r.req not in drawn:
                drawn[r.req] = uniforms(r.req.generator, r.req.n, self.engine.device)
        return torch.cat([drawn[r.req][r.index] for r in rows]).view(-1, 1)

    def _advance(self, rows: list[_Row], chosen: list[int],
                 scores: list[tuple[float | None, list | None]]) -> None:
        """Record each row's token, emit its event, and let finished rows leave."""
        eos = self.engine.tokenizer.eos_id
        out: dict[BatchRequest, list[StreamEvent]] = {}
        leaving = set()
        for r, tok, (lp, top) in zip(rows, chosen, scores):
            r.tokens.append(tok)
            if len(r.tokens) > 2 * self.block_size:  # a rebuild needs only the last window
                del r.tokens[: -self.block_size]
            r.count += 1
            self.tokens_generated += 1
            if r.mask is not None:
                r.mask.advance([tok])
            finish = None
            if r.req.params.stop_at_eos and tok == eos:
                text, finish = r.decoder.decode(b"", final=True), "stop"
            else:  # not final: a character cut off by max_new_tokens is dropped, as in Engine
                text = r.decoder.decode(self.engine.tokenizer.token_bytes(tok))
                if r.count == r.req.params.max_new_tokens:
                    finish = "length"
            event = StreamEvent(r.index, text, tok, finish, lp, top)
            events = [event] if r.stop is None else _cut(r, event)
            out.setdefault(r.req, []).extend(events)
            if events and events[-1].finish_reason is not None:
                leaving.add(id(r))
        for s in range(len(self.rows) - 1, -1, -1):
            if id(self.rows[s]) in leaving:
                self._remove_row(s)
        for req, events in out.items():
            if req.live == 0:
                with self._lock:
                    self._active.discard(req)
                    self._reserved -= req.n
                req._emit(events, done=True)
            else:
                req._emit(events)


def _cut(r: _Row, event: StreamEvent) -> list[StreamEvent]:
    """Stop strings: a row's events wait while the matcher holds their text back, and leave with
    exactly the text it lets through, so text and logprobs are cut at the same place. At a stop
    string, the token it cuts keeps the text before it; the tokens inside it leave with no text
    and no logprob (still counted), the last of them carrying finish_reason "stop"."""
    m = r.stop
    through = len(m.feed(event.text))
    if event.finish_reason is not None and not m.stopped:
        through += len(m.flush())  # the row ends: release the held text, or find the stop in it
    finish = "stop" if m.stopped else event.finish_reason
    r.held.append((r.produced, event))
    r.produced += len(event.text)
    r.through += through
    out = []
    while r.held:
        start, ev = r.held[0]
        whole = start < r.through and start + len(ev.text) <= r.through
        if not (whole or finish is not None):
            break
        r.held.popleft()
        if whole or not m.stopped:
            out.append(dataclasses.replace(ev, finish_reason=None))
        elif start < r.through:  # the stop string begins inside this token
            out.append(dataclasses.replace(ev, text=ev.text[: r.through - start],
                                           finish_reason=None))
        else:
            out.append(StreamEvent(ev.index, "", ev.token))
    if finish is not None:
        out[-1] = dataclasses.replace(out[-1], finish_reason=finish)
    return out
