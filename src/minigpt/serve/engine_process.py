"""`minigpt serve`'s decoder in a process of its own, so that nothing else competes for its GIL.

The HTTP process (uvicorn, the event loop, tokenizing, JSON and SSE) and the decoding loop used to
share one interpreter: torch releases the GIL inside every operation and takes it back after, and
whenever the event loop held it meanwhile, the next operation waited (up to Python's 5 ms switch
interval). vLLM's V1 engine splits the two the same way; docs/server.md has the measurements.

    HTTP process                                  engine process (its main thread decodes)
    EngineProcess.submit ---("submit", id, ids, params, stop)--->  Batcher.submit
    RemoteRequest.cancel ---("cancel", id)----------------------->  BatchRequest.cancel
    EngineProcess.close  ---("close",)--------------------------->  Batcher.close, then exit
    reader thread        <--("events", [(id, events, done, error)], stats)---  after each step

Both processes load the run: the HTTP side keeps its engine for what is not decoding (tokenizing,
echo scoring, /inspect, checking constraints). Requests are checked there (`prepare_request`)
before they are sent, so a bad one is a 400 at once; the waiting line's limit is kept there too,
counted over the requests sent and not yet finished, in order, by the batcher's own rule
(`without_rows`): the engine's batch admits in that order, so both sides agree, except that a
request the engine finished counts until its last events arrive (a busy answer can come one step
early, never late).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MiniGPTError
from ..request_events import EventBuffer

# torch is imported when first needed, not with this module: the CLI starts the engine process
# before its own process imports torch, so that the two imports (seconds each) overlap.
if TYPE_CHECKING:
    from ..batching import Batcher, BatchRequest, Prompt
    from ..config import ServeConfig
    from ..engine import Engine
    from ..request_events import StreamEvent
    from ..sampling import SamplingParams


# The child inherits its end of a socket pair (subprocess's pass_fds): POSIX systems. Elsewhere
# (Windows) the server decodes in its own process, on a batcher thread.
SUPPORTED = os.name == "posix"


class EngineExited(MiniGPTError):
    """The engine process is gone (it crashed, was killed, or could not load the run)."""


class RemoteRequest(EventBuffer):
    """The HTTP side of one submitted prompt: its events as the engine sends them, read as a
    BatchRequest's are."""

    def __init__(self, rid: int, n: int, notify: Callable[[], None] | None,
                 on_cancel: Callable[[RemoteRequest], None]):
        super().__init__(n, notify, on_cancel)
        self.rid = rid


class EngineProcess:
    """The Batcher interface the app uses (submit, running, waiting, stats, close), over a batcher
    that decodes in a child process started from the same run.

    Made in two steps so that both processes load the run at once: the constructor starts the
    child, which loads the run while this process loads its own copy; `connect(engine)` then waits
    for the child to be ready."""

    def __init__(self, run_dir: str | Path, *, checkpoint: str, device: str, dtype: str,
                 max_rows: int, max_queue: int, prompt_cache: int, threads: int = 0,
                 compile: bool = False):
        self.engine: Engine | None = None
        self.max_rows, self.max_queue = max_rows, max_queue
        # A new interpreter running this module, not multiprocessing's spawn: spawn would import
        # the caller's main script again in the child (a script that calls serve() at top level
        # would start a second server). The two ends of a socket pair are the pipe.
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-c", f"from {__name__} import engine_main; "
             f"engine_main({theirs.fileno()})"], env=env, pass_fds=(theirs.fileno(),))
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send((str(run_dir), checkpoint, device, dtype, threads,
                         dict(max_rows=max_rows, prompt_cache=prompt_cache, compile=compile)))
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._requests: dict[int, RemoteRequest] = {}  # sent, not finished: in submission order
        self._next_id = 0
        self._closed = False
        self.failure: str | None = None  # why the engine is gone, when it went by itself
        self._stats: dict[str, Any] = {}
        self._reader: threading.Thread | None = None

    @classmethod
    def for_serving(cls, run_dir: str | Path, config: ServeConfig, *, checkpoint: str, device: str,
                    dtype: str) -> EngineProcess | None:
        """The engine process of `minigpt serve RUN` with these settings (None where there is
        none: the server then decodes on a thread of its own process)."""
        if not SUPPORTED:
            return None
        return cls(run_dir, checkpoint=checkpoint, device=device, dtype=dtype,
                   max_rows=config.max_concurrency, max_queue=config.max_queue,
                   prompt_cache=config.prompt_cache, threads=config.threads,
                   compile=config.compile)

    def connect(self, engine: Engine) -> EngineProcess:
        """Wait until the child has loaded the run; `engine`, this process's copy of it, checks
        and tokenizes requests."""
        self.engine = engine
        first = self._receive()
        if first is None or first[0] != "ready":
            self.close()
            raise EngineExited(first[1] if first else "the engine process exited while starting")
        self._stats = first[1]
        self._reader = threading.Thread(target=self._read, name="minigpt-engine-reader",
                                        daemon=True)
        self._reader.start()
        return self

    # ---- what the app calls (the event loop's thread) ----------------------------------------

    def submit(self, prompt: Prompt = "", params: SamplingParams | None = None, *,
               stop: Sequence[str] = (), notify: Callable[[], None] | None = None,
               **settings: Any) -> RemoteRequest:
        from ..batching import BatcherBusy, busy_message, prepare_request, without_rows

        ids, params, _ = prepare_request(self.engine, self.max_rows, prompt, params, stop,
                                         **settings)
        with self._lock:
            if self.failure is not None:
                raise EngineExited(self.failure)
            if self._closed:
                raise BatcherBusy("the server is shutting down")
            sizes = [r.n for r in self._requests.values()] + [params.num_samples]
            if without_rows(sizes, self.max_rows) > self.max_queue:
                raise BatcherBusy(busy_message(self.max_rows, self.max_queue))
            rid, self._next_id = self._next_id, self._next_id + 1
            req = RemoteRequest(rid, params.num_samples, notify, self._cancel)
            self._requests[rid] = req
        self._send(("submit", rid, ids, params, tuple(stop)))
        return req

    @property
    def running(self) -> int:
        return self._counts()[0]

    @property
    def waiting(self) -> int:
        return self._counts()[1]

    def stats(self) -> dict[str, Any]:
        """The engine's counters as of its last step; running and waiting as this side counts."""
        running, waiting = self._counts()
        with self._lock:
            return {**self._stats, "running": running, "waiting": waiting}

    def close(self) -> None:
        """Stop the engine: requests not finished end (as if cancelled); waits for it to exit."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._send(("close",))
        except OSError:  # already gone
            pass
        if self._reader is not None:
            self._reader.join(30)
        if self._wait(30 if self._reader is not None else 0) is None:
            self._process.kill()
            self._wait(5)

    # ---- internals ------------------------------------------------------------------------------

    def _wait(self, seconds: float) -> int | None:
        """The engine process's exit status, or None if it is still running after `seconds`."""
        try:
            return self._process.wait(seconds)
        except subprocess.TimeoutExpired:
            return None

    def _counts(self) -> tuple[int, int]:
        """(running, waiting): the requests sent and not finished, split by the batcher's rule."""
        from ..batching import without_rows

        with self._lock:
            sizes = [r.n for r in self._requests.values()]
        waiting = without_rows(sizes, self.max_rows)
        return len(sizes) - waiting, waiting

    def _cancel(self, req: RemoteRequest) -> None:
        try:
            self._send(("cancel", req.rid))
        except OSError:  # the engine is gone; the reader ends every request
            pass

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _receive(self) -> tuple | None:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            return None

    def _read(self) -> None:
        """The reader thread: the engine's events to their requests, until it exits."""
        while (message := self._receive()) is not None and message[0] == "events":
            _, batch, stats = message
            finished = []
            with self._lock:
                self._stats = stats
                for rid, events, done, error in batch:
                    req = self._requests.get(rid)
                    if req is not None:
                        finished.append((req, events, done, error))
                        if done:
                            del self._requests[rid]
            for req, events, done, error in finished:
                req._emit(events, done, error)
        with self._lock:
            gone, self._requests = list(self._requests.values()), {}
            closing, self._closed = self._closed, True
        error = None
        if not closing:
            self.failure = (f"the engine process exited (code {self._wait(5)}); "
                            "restart the server")
            error = EngineExited(self.failure)
        for req in gone:
            req._emit([], True, error)


def engine_main(fd: int) -> None:
    """The engine process: load the run the HTTP process names on the socket `fd`, then decode
    what it sends until it says close (or goes away). Ctrl-C in a terminal reaches every process
    of the group: this one ignores it and stops when the HTTP side, which decides about shutting
    down, says so."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..batching import Batcher
    from ..compiled import CompileError
    from ..cpu import engine_threads
    from ..engine import load

    conn = Connection(fd)
    try:
        run_dir, checkpoint, device, dtype, threads, settings = conn.recv()
    except (EOFError, OSError):
        return
    try:
        engine_threads(threads)
        engine = load(run_dir, checkpoint=checkpoint, device=device, dtype=dtype)
        # no limit of its own on the waiting line: the HTTP side keeps it
        batcher = Batcher(engine, start=False, max_queue=1 << 30, **settings)
    except CompileError as e:
        conn.send(("failed", str(e)))
        return
    except Exception as e:
        conn.send(("failed", f"the engine process could not load {run_dir}: {e}"))
        return
    if batcher.compile_seconds:
        print(f"minigpt: compiled the one-row decode step in {batcher.compile_seconds:.1f} s",
              file=sys.stderr, flush=True)
    conn.send(("ready", batcher.stats()))
    _decode(conn, batcher)


def _decode(conn: Any, batcher: Batcher) -> None:
    requests: dict[int, BatchRequest] = {}
    ready: list[int] = []  # requests with new events, in the order they got them

    def notify_for(rid: int) -> Callable[[], None]:
        return lambda: ready.append(rid)

    def handle(message: tuple) -> bool:
        kind = message[0]
        if kind == "submit":
            _, rid, ids, params, stop = message
            try:
                requests[rid] = batcher.submit(ids, params, stop=stop, notify=notify_for(rid))
            except Exception as e:  # checked on the HTTP side already; kept for safety
                ready.append(rid)
                requests[rid] = _Failed(e)
        elif kind == "cancel":
            req = requests.get(message[1])
            if req is not None:
                req.cancel()
        return kind != "close"

    open_ = True
    while open_:
        try:
            if not batcher.has_work and not ready:
                open_ = handle(conn.recv())  # idle: block until the next message
            while open_ and conn.poll():
                open_ = handle(conn.recv())
        except (EOFError, OSError):  # the HTTP process is gone
            open_ = False
        if open_ and batcher.has_work:
            batcher.step()
        if not open_:
            batcher.close()  # ends every request (their final events go out below)
        _send_events(conn, batcher, requests, ready)


class _Failed:
    """A request the engine refused: one error event."""

    def __init__(self, error: BaseException):
        self.error = error

    def drain(self) -> tuple[list[StreamEvent], bool]:
        raise self.error

    def cancel(self) -> None:
        pass


def _send_events(conn: Any, batcher: Batcher, requests: dict[int, Any], ready: list[int]) -> None:
    if not ready:
        return
    batch = []
    for rid in dict.fromkeys(ready):
        req = requests.get(rid)
        if req is None:
            continue
        try:
            events, done = req.drain()
        except Exception:
            events, done = [], True
        error = getattr(req, "error", None)
        if error is not None:  # drain() gives the events before it raises the error: both go now
            done, error = True, _picklable(error)
        if done:
            del requests[rid]
        batch.append((rid, events, done, error))
    ready.clear()
    try:
        conn.send(("events", batch, batcher.stats()))
    except (OSError, EOFError):  # the HTTP process is gone; the loop ends at its next receive
        pass


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
