"""The one generation loop: many requests decoded together in one batch that they join and leave at
any token boundary. `Engine.stream` drives a batcher of its own synchronously; the server drives one
from a thread.

    batcher = Batcher(minigpt.load("runs/x"), max_rows=32)
    req = batcher.submit("ROMEO:", max_new_tokens=50, seed=1)     # returns at once
    for event in req: print(event.text, end="")                   # StreamEvents
    batcher.close()

With a thread (`start=True`), that thread owns the model and the batch: `submit` hands it a
request through a lock-protected line, and events come back through each request's own
lock-protected buffer, which a reader drains (blocking iteration, or `drain()` after a `notify`
callback: the server's way). Without one, the caller runs `step()` itself.

Each step: requests waiting in line join while rows are free (a request takes n rows); prompts are
prefilled, up to `prefill_chunk` tokens per step so a long prompt does not stall the running rows,
into a scratch cache (whole prompts that fit together in one forward, one row each; a long one
alone, chunk by chunk, with logits for the last position only); a finished prefill is copied into
its n rows (one prefill for n samples). Then every row decodes one token in one `GPT.forward`,
each at its own position. A row leaves at EOS, a stop string, its max_new_tokens or its request's
cancellation, and its row is reused at once (the last row moves into the hole, so the batch stays
rows 0..b-1). A row that fills the context window goes on from the last 3/4 of it (`_rebuild`):
cached keys carry their absolute positions, learned or rotary, so they cannot be shifted in place,
and generation goes on for any length at the cost of one re-prefill every block_size/4 tokens.

Per row: the UTF-8 mask (`utf8.Utf8Mask`) and a structured-output constraint's mask
(`structured.ConstraintMask`, for constrained rows only; a row its constraint leads into a dead end
leaves with "length", and EOS ends a complete one) applied to the logits before choosing, every row's token
chosen in one `sampling.choose_tokens` call with per-row settings, and with `logprobs` the token's
log-probability and top k under the distribution it was drawn from. With stop strings, a row's
events wait while the matcher holds their text back and leave with the text it lets through
(`_cut`), so text and logprobs are cut at the same place. Text is decoded incrementally per row
(a multi-byte character is printed once complete; one cut off by max_new_tokens is dropped).

Each request has its own torch.Generator (seeded from its seed, else at random) and draws its
uniforms for all of its n rows every step (also for rows that already left), so its random numbers
never depend on the other requests in the batch. What batching can change is rounding: see
docs/server.md, "Reproducibility".

Threads: `run()` is the loop, in whichever thread calls it; `step()` is one turn of it.
`minigpt serve` steps its batcher from the main thread of a process of its own
(serve/engine_process.py), the thread that loaded the model and owns torch's thread pool. A
batcher started with its own thread (`start=True`) runs torch there with `threads` intra-op
threads (default: one fewer than torch's pool, at least one). Why not the whole pool: GNU OpenMP
counts every OpenMP thread of the process, and the loading thread's pool already holds one per
core; a second full pool makes more OpenMP threads than cores, OpenMP then stops spinning between
operations, and every matrix product waits for its workers to wake through the kernel: a decode
step ran 2x slower that way here (docs/speed.md).
"""

from __future__ import annotations

import codecs
import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError
from .kv_cache import KVCache
from .prompt_cache import PromptCache
from .request_events import EventBuffer, StreamEvent
from .sampling import (
    RowSettings,
    SamplingParams,
    choose_tokens,
    distribution,
    token_logprobs,
)
from .stop_strings import StopMatcher
from .structured import ConstraintMask, RowMatcher
from .utf8 import Utf8Mask

if TYPE_CHECKING:
    from .engine import Engine

Prompt = str | Sequence[int]  # text, or token ids that are used as they are
DRAW_AHEAD = 32  # steps of uniforms a request draws at once


class BatcherBusy(Exception):
    """Every row is taken and the waiting line is full (or the batcher is closed)."""


class BatchRequest(EventBuffer):
    """One submitted prompt with its n samples: iterate it for StreamEvents, or `drain()` them
    (request_events.EventBuffer). Written by the batcher thread, read by any one other thread;
    `cancel()` from anywhere."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop: Sequence[str],
                 notify: Callable[[], None] | None, device: torch.device,
                 on_cancel: Callable[[BatchRequest], None], grammar: Any = None):
        super().__init__(params.num_samples, notify, on_cancel)
        self.prompt_ids, self.params, self.stop = prompt_ids, params, tuple(stop)
        self.grammar = grammar  # params.constraint compiled for the engine's vocabulary
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.live = 0  # rows still generating (batcher thread only)
        self.fed = 0  # prompt tokens prefilled so far (batcher thread only)
        self._draws: list[list[float]] = []  # uniforms drawn ahead, one list of n per step

    def next_uniforms(self) -> list[float]:
        """This step's uniforms, one per sample. Drawn DRAW_AHEAD steps at a time: one call to
        the generator instead of one per step and request, and on the CPU the same numbers in the
        same order (its generator fills a tensor serially)."""
        if not self._draws:
            self._draws = torch.rand(DRAW_AHEAD, self.n, generator=self.generator,
                                     device=self.generator.device).tolist()[::-1]
        return self._draws.pop()


class _Row:
    """One sequence in the batch: its tokens so far, its cache length, its text decoding, its
    UTF-8 mask state, its place in its constraint and its events held back by a stop string."""

    __slots__ = ("req", "index", "tokens", "length", "decoder", "stop", "count", "mask",
                 "matcher", "held", "produced", "through")

    def __init__(self, req: BatchRequest, index: int, tokens: list[int], length: int,
                 mask: Utf8Mask | None, matcher: RowMatcher | None = None):
        self.req, self.index, self.tokens, self.length = req, index, tokens, length
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = StopMatcher(req.stop) if req.stop else None
        self.count = 0  # tokens generated
        self.mask = mask  # this row's own Utf8Mask (one row), None when not masking
        self.matcher = matcher  # its constraint's matcher, None when unconstrained
        # with stop strings: events whose text the matcher still holds back, with where their
        # text starts; characters produced, and characters the matcher let through
        self.held: deque[tuple[int, StreamEvent]] = deque()
        self.produced = self.through = 0


def prepare_request(engine: Engine, max_rows: int, prompt: Prompt,
                    params: SamplingParams | None, stop: Sequence[str],
                    **settings: Any) -> tuple[list[int], SamplingParams, Any]:
    """A request as a batch of `max_rows` rows runs it: (prompt ids cut to the context, params,
    compiled constraint), or ConfigError naming what cannot run. Compiled in the caller's thread:
    a constraint the vocabulary cannot begin fails before anything is queued (the engine keeps
    compiled grammars, so a second compile of the same constraint is a look-up)."""
    params = (params or SamplingParams()).replace(**settings)
    if params.num_samples > max_rows:
        raise ConfigError(f"{params.num_samples} samples need more rows than the batch has "
                          f"({max_rows})")
    if any(not s for s in stop):
        raise ConfigError("stop strings must be non-empty")
    ids = engine.encode_prompt(prompt)[-engine.block_size:]
    if not ids:
        raise ConfigError("the prompt has no tokens (pass text, or at least one token id)")
    grammar = engine.grammars.compile(params.constraint) if params.constraint is not None else None
    return ids, params, grammar


def without_rows(sizes: Sequence[int], free: int) -> int:
    """How many requests of a line (their row counts, in line order) do not get rows when `free`
    rows are free: the line is first come, first served, so the first that does not fit holds
    back every one behind it."""
    for i, n in enumerate(sizes):
        if n > free:
            return len(sizes) - i
        free -= n
    return 0


def busy_message(max_rows: int, max_queue: int) -> str:
    return (f"all {max_rows} rows are busy and {max_queue} requests are already waiting; "
            "retry later")


class Batcher:
    """Every admitted request decoded in one batch of up to `max_rows` rows, by its own thread
    (`start=True`) or by whoever calls `step()`."""

    def __init__(self, engine: Engine, max_rows: int = 32, max_queue: int = 64,
                 prefill_chunk: int = 64, start: bool = True, threads: int | None = None,
                 prompt_cache: int = 0, compile: bool = False):
        """`start=False`: no thread; the caller runs `step()` itself (`Engine.stream`, and tests
        that decide at which step each request joins). `threads`: torch's intra-op threads in the
        batcher's thread (see the module docstring). `prompt_cache`: sequences whose keys and
        values are kept for requests that start the same way (prompt_cache.py; 0 = off).
        `compile`: a lone row decodes through a compiled step (compiled.py), built here."""
        for name, value, lo in (("max-rows", max_rows, 1), ("max-queue", max_queue, 0),
                                ("prefill-chunk", prefill_chunk, 1),
                                ("prompt-cache", prompt_cache, 0)):
            if value < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {value}")
        self.engine, self.model = engine, engine.model
        self.failure: str | None = None  # as EngineProcess's: why decoding stopped (never, here)
        self.max_rows, self.max_queue, self.prefill_chunk = max_rows, max_queue, prefill_chunk
        self.block_size = engine.block_size
        self.cache = KVCache.for_model(self.model, max_rows)
        self.scratch = KVCache.for_model(self.model, max_rows)  # prompts are prefilled here
        self.scratch_len = 0  # of a long prompt prefilled over several steps, in scratch row 0
        self.prompt_cache = PromptCache(self.model, prompt_cache) if prompt_cache else None
        self._one_row = None  # the compiled step of cache row 0, when asked for
        self.compile_seconds = 0.0
        if compile:
            from .compiled import one_row_step

            self._one_row, self.compile_seconds = one_row_step(self.model, self.cache)
        self.rows: list[_Row] = []  # rows[s] lives in cache row s
        self._settings: RowSettings | None = None  # of self.rows, rebuilt when rows join or leave
        self._constraint_mask: ConstraintMask | None = None  # made by the first constrained row
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
        self.threads = threads
        self._looping = False  # run() is decoding in some thread
        self._stopped = threading.Event()  # run() has returned
        self._thread = None
        if start:
            if threads is None:
                self.threads = max(1, torch.get_num_threads() - 1)
            self._thread = threading.Thread(target=self.run, name="minigpt-batcher", daemon=True)
            self._thread.start()

    # ---- any thread --------------------------------------------------------------------------

    def submit(self, prompt: Prompt = "", params: SamplingParams | None = None, *,
               stop: Sequence[str] = (), notify: Callable[[], None] | None = None,
               **settings: Any) -> BatchRequest:
        """Queue a request (settings as Engine.stream); raises BatcherBusy when the line is full.

        `notify` is called from the batcher thread when new events are ready (once until they are
        drained): the server uses it to wake its event loop."""
        ids, params, grammar = prepare_request(self.engine, self.max_rows, prompt, params, stop,
                                               **settings)
        req = BatchRequest(ids, params, stop, notify, self.engine.device, self._withdraw, grammar)
        with self._lock:
            if self._closed:
                raise BatcherBusy("the batcher is closed")
            if self._queued(extra=req) > self.max_queue:
                raise BatcherBusy(busy_message(self.max_rows, self.max_queue))
            self._line.append(req)
            self._lock.notify()
        return req

    def _queued(self, extra: BatchRequest | None = None) -> int:
        """Requests in line that will not get rows at the next step (lock held)."""
        line = [*self._line, extra] if extra is not None else self._line
        return without_rows([req.n for req in line], self.max_rows - self._reserved)

    @property
    def has_work(self) -> bool:
        """Requests in line or holding rows: a step would do something."""
        with self._lock:
            return bool(self._line or self._reserved)

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

    def stats(self) -> dict[str, Any]:
        """What /metrics shows: requests running and waiting, rows, steps and tokens so far."""
        return {"running": self.running, "waiting": self.waiting, "rows_in_use": self.rows_in_use,
                "rows": self.max_rows, "steps": self.steps, "row_steps": self.row_steps,
                "tokens_generated": self.tokens_generated,
                "prompt_tokens_prefilled": self.prompt_tokens_prefilled,
                "prompt_cache_hits": self.prompt_cache.hits if self.prompt_cache else 0,
                "prompt_tokens_reused": self.prompt_cache.tokens_reused if self.prompt_cache else 0}

    def _withdraw(self, req: BatchRequest) -> None:
        with self._lock:
            try:
                self._line.remove(req)
            except ValueError:
                self._lock.notify()  # holding rows: the batcher frees them at its next step
                return
        req._emit([], done=True)

    def close(self) -> None:
        """Stop decoding (the own thread, or `run()` in another); every request not yet finished
        ends (as if cancelled)."""
        with self._lock:
            self._closed = True
            looping = self._looping
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(30)
        elif looping:
            self._stopped.wait(30)
        else:
            self._fail_all(None)

    @torch.inference_mode()
    def step(self) -> None:
        """One step by hand (a batcher made with start=False): admit, decode, prefill."""
        with self._lock:
            self._admit()
        self._step_or_fail()

    def run(self) -> None:
        """Decode every submitted request until `close()`, in the calling thread: the batcher's own
        thread, or the main thread when readers run in another (the thread that loaded the model
        owns torch's OpenMP pool, and decodes at its full speed there)."""
        with self._lock:
            if self._closed:
                return
            self._looping = True
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
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
        finally:
            self._stopped.set()

    # ---- the decoding thread -----------------------------------------------------------------

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
            self._settings = None
            self._reserved = 0
            self.scratch_len = 0
        for req in reqs:
            req._emit([], done=True, error=error)

    def _step(self) -> None:
        self._drop_cancelled()
        if self.rows:
            self._decode_rows()
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            if self.prompt_cache is not None and self._prefilling[0].fed == 0:
                self._reuse_prefix(self._prefilling[0])
            group = self._whole_prompts(budget)
            if len(group) > 1:
                budget -= self._prefill_together(group)
            else:
                budget -= self._prefill_some(self._prefilling[0], budget)

    def _drop_cancelled(self) -> None:
        for s in range(len(self.rows) - 1, -1, -1):
            if self.rows[s].req.cancelled:
                self._remove_row(s)
        for req in [r for r in (*self._active, *self._prefilling) if r.cancelled]:
            if self._prefilling and req is self._prefilling[0]:
                self.scratch_len = 0  # its prompt was half prefilled
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
        self._settings = None

    def _prefill(self, ids: list[int], cache: KVCache, pos: int) -> torch.Tensor:
        """Prompt tokens into the first row of `cache` at `pos` -> the last position's logits
        (1, vocab)."""
        chunk = torch.tensor([ids], dtype=torch.long, device=self.engine.device)
        out, _ = self.model(chunk, cache=cache, pos=pos, last_only=True)
        return out[:, -1]

    def _whole_prompts(self, budget: int) -> list[BatchRequest]:
        """The requests at the head of the line whose whole prompts fit in `budget` tokens."""
        group, total = [], 0
        for req in self._prefilling:
            total += len(req.prompt_ids)
            if req.fed or total > budget:
                break
            group.append(req)
        return group

    def _reuse_prefix(self, req: BatchRequest) -> None:
        """The head request's prompt starts like a kept sequence: copy those positions into scratch
        row 0 and prefill only the rest (as a long prompt is, from where it stands)."""
        slot, m = self.prompt_cache.lookup(req.prompt_ids)
        if m:
            self.prompt_cache.copy_into(slot, m, self.scratch, 0)
            req.fed = self.scratch_len = m

    def _keep(self, ids: list[int], cache: KVCache, row: int) -> None:
        if self.prompt_cache is not None:
            self.prompt_cache.store(ids, cache, row)

    def _prefill_together(self, group: list[BatchRequest]) -> int:
        """Several whole prompts in one forward, one scratch row each, right-padded: a causal
        row's last real position sees none of the padding after it, and the padding's keys lie
        past the row's length, never copied. Each request then joins."""
        lengths = [len(req.prompt_ids) for req in group]
        T = max(lengths)
        tokens = torch.tensor([req.prompt_ids + [0] * (T - n) for req, n in zip(group, lengths)],
                              device=self.engine.device)
        logits, _ = self.model(tokens, cache=self.scratch, pos=0)
        for r, (req, n) in enumerate(zip(group, lengths)):
            self._prefilling.popleft()
            req.fed = n
            self._keep(req.prompt_ids, self.scratch, r)
            self._join(req, logits[r : r + 1, n - 1], r, n)
        self.prompt_tokens_prefilled += sum(lengths)
        return sum(lengths)

    def _prefill_some(self, req: BatchRequest, budget: int) -> int:
        """Prefill up to `budget` tokens of the head request's prompt; when done, give it rows."""
        ids = req.prompt_ids
        take = min(budget, len(ids) - req.fed)
        logits = self._prefill(ids[req.fed : req.fed + take], self.scratch, self.scratch_len)
        req.fed += take
        self.scratch_len += take
        self.prompt_tokens_prefilled += take
        if req.fed == len(ids):
            self._prefilling.popleft()
            self._keep(ids, self.scratch, 0)
            self._join(req, logits, 0, self.scratch_len)
            self.scratch_len = 0
        return take

    def _join(self, req: BatchRequest, logits: torch.Tensor, scratch_row: int, length: int
              ) -> None:
        """The prompt is in a scratch row: copy it into n rows and choose their first tokens."""
        rows = []
        masking = self.engine.utf8_masking(req.params)
        for i in range(req.n):
            self.cache.copy_rows(self.scratch, scratch_row, len(self.rows), length)
            mask = Utf8Mask(self.engine.utf8_table, 1) if masking else None  # states only: CPU
            matcher = (self.engine.grammars.matcher(req.grammar) if req.grammar is not None
                       else None)
            row = _Row(req, i, list(req.prompt_ids), length, mask, matcher)
            self.rows.append(row)
            rows.append(row)
        req.live = req.n
        with self._lock:
            self._active.add(req)
        settings = RowSettings.of([req.params] * req.n, logits.size(-1), logits.device)
        self._choose(logits.expand(req.n, -1), rows, settings)
        self._settings = None

    def _rebuild(self, s: int, row: _Row) -> None:
        """The window is full: row s goes on from the last 3/4 of it. All but the newest token are
        prefilled again at positions 0..; the decode step then adds the newest."""
        T = self.block_size
        keep = max(1, T - T // 4)
        row.length = 0
        if keep > 1:
            self._prefill(row.tokens[-keep:-1], self.cache.rows(s), 0)
            row.length = keep - 1

    def _decode_rows(self) -> None:
        for s, row in enumerate(self.rows):
            if row.length == self.block_size:
                self._rebuild(s, row)
        rows = list(self.rows)
        lengths = [r.length for r in rows]
        if self._one_row is not None and len(rows) == 1:
            logits = self._one_row(rows[0].tokens[-1], lengths[0])
        else:
            tokens = torch.tensor([[r.tokens[-1]] for r in rows], device=self.engine.device)
            # rows at one length write one span of the cache, without per-row positions or masks
            pos = lengths[0] if min(lengths) == max(lengths) else lengths
            logits, _ = self.model(tokens, cache=self.cache, pos=pos)
        for r in rows:
            r.length += 1
        self.steps += 1
        self.row_steps += len(rows)
        if self._settings is None:
            self._settings = RowSettings.of([r.req.params for r in rows], logits.size(-1),
                                            logits.device)
        self._choose(logits[:, -1], rows, self._settings)

    def _choose(self, logits: torch.Tensor, rows: list[_Row], settings: RowSettings) -> None:
        """Next token of every row (logits[i] is rows[i]'s) in one `choose_tokens` call: UTF-8
        masked rows choose from masked logits, each request's uniforms come from its own generator,
        and logprobs from the same distribution the tokens were drawn from."""
        masked, dead = self._masked(logits, rows)
        x = distribution(masked, settings)
        u = None if settings.all_greedy else self._uniforms(rows)
        tokens = choose_tokens(x, settings, u)
        chosen = tokens.tolist()
        scores: list[tuple[float | None, list | None]] = [(None, None)] * len(rows)
        scored = [i for i, r in enumerate(rows) if r.req.params.logprobs is not None]
        if scored:
            k = max(rows[i].req.params.logprobs for i in scored)
            pick = torch.tensor(scored, device=x.device)
            s = token_logprobs(x[pick], tokens[pick], k)
            for i, lp, vals, ids in zip(scored, s.logprob.tolist(), s.top_logprobs.tolist(),
                                        s.top_ids.tolist()):
                top = list(zip(ids, vals))[: rows[i].req.params.logprobs]
                # a token filtered out has probability 0 (-inf): not an alternative, and not JSON
                scores[i] = (lp, [(t, v) for t, v in top if v != float("-inf")])
        for i in dead:
            scores[i] = (None, None)
        self._advance(rows, chosen, scores, dead)

    def _masked(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, list[int]]:
        """logits with each masked row's tokens that would break its UTF-8, and each constrained
        row's tokens its constraint does not allow, set to -inf; and the constrained rows that no
        token can continue (`ConstraintMask.apply`)."""
        if any(r.mask is not None for r in rows):  # no table needed otherwise (built on first use)
            logits = self.engine.utf8_table.mask(
                logits, [None if r.mask is None else r.mask.states[0] for r in rows])
        if all(r.matcher is None for r in rows):
            return logits, []
        if self._constraint_mask is None:
            self._constraint_mask = ConstraintMask(self.engine.grammars, self.max_rows)
        return self._constraint_mask.apply(logits, [r.matcher for r in rows])

    def _uniforms(self, rows: list[_Row]) -> torch.Tensor:
        """Every request draws for all n of its rows, also those that left, then keeps its live
        ones: its draws never depend on the rest of the batch. A greedy request draws nothing."""
        drawn: dict[BatchRequest, list[float]] = {}
        for r in rows:
            if r.req not in drawn:
                drawn[r.req] = (r.req.next_uniforms() if r.req.params.temperature > 0
                                else [0.0] * r.req.n)
        return torch.tensor([drawn[r.req][r.index] for r in rows], dtype=torch.float32,
                            device=self.engine.device).view(-1, 1)

    def _advance(self, rows: list[_Row], chosen: list[int],
                 scores: list[tuple[float | None, list | None]], dead: Sequence[int] = ()) -> None:
        """Record each row's token, emit its event, and let finished rows leave. A dead row (its
        constraint needs a token the vocabulary lacks) leaves without one, cut off: "length"."""
        eos = self.engine.tokenizer.eos_id
        out: dict[BatchRequest, list[StreamEvent]] = {}
        leaving = set()
        for i, (r, tok, (lp, top)) in enumerate(zip(rows, chosen, scores)):
            if dead and i in dead:
                event = StreamEvent(r.index, "", None, "length")
                events = [event] if r.stop is None else _cut(r, event)
                out.setdefault(r.req, []).extend(events)
                leaving.add(id(r))
                continue
            r.tokens.append(tok)
            if len(r.tokens) > 2 * self.block_size:  # a rebuild needs only the last window
                del r.tokens[: -self.block_size]
            r.count += 1
            self.tokens_generated += 1
            if r.mask is not None:
                r.mask.advance([tok])
            if r.matcher is not None:
                r.matcher.advance(tok)
            finish = None
            # a constraint allows EOS only where its text is complete, and nothing after it
            if tok == eos and (r.req.params.stop_at_eos or r.matcher is not None):
                text, finish = r.decoder.decode(b"", final=True), "stop"
            else:  # not final: a character cut off by max_new_tokens is dropped, never U+FFFD
                text = r.decoder.decode(self.engine.tokenizer.token_bytes(tok))
                if r.count == r.req.params.max_new_tokens:
                    finish = "length"
            event = StreamEvent(r.index, text, tok, finish, lp, top)
            events = [event] if r.stop is None else _cut(r, event)
            out.setdefault(r.req, []).extend(events)
            if events and events[-1].finish_reason is not None:
                leaving.add(id(r))
        for s in range(len(self.rows) - 1, -1, -1):
            r = self.rows[s]
            if id(r) in leaving:
                # a finished first sample: its prompt and reply (a chat's next prompt starts so);
                # cache positions 0..length-1 hold the tokens before the newest, rebuilt or not
                if r.index == 0 and len(r.tokens) > r.length:
                    self._keep(r.tokens[len(r.tokens) - 1 - r.length : -1], self.cache, s)
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
