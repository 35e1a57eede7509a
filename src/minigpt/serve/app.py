"""`minigpt serve`: an OpenAI-compatible HTTP API over `Engine`, with streaming, auth and a playground.

Endpoints: `GET /` (playground page), `GET /health`, `GET /metrics` (Prometheus), `GET /v1/models`,
`GET /v1/models/{id}`, `POST /v1/completions` (OpenAI Completions API, SSE streaming),
`POST /v1/chat/completions` (Chat Completions, through the run's plain-text template,
`minigpt.chat_template`; request and reply shapes in `chat_api`). With an API key set, every `/v1/*` request needs
`Authorization: Bearer KEY`. Requests are checked in `openai_api`; generation runs in one
continuous batch (`jobs`, over `minigpt.batching`: in a process of its own under `serve`,
`engine_process`), never on the event loop; stop strings end a row there too, and its logprobs stop with its text.

    app = create_app(minigpt.load("runs/x"), api_key="secret")   # in-process, e.g. for tests
    serve("runs/x", ServeConfig(port=8000))                       # what the CLI runs

Every setting (host, port, limits, stream interval, template, UTF-8 mask) is a field of
config.ServeConfig, with its default and its one check.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..batching import Batcher, BatcherBusy, Prompt
from ..chat_template import ChatTemplate, load_template
from ..config import ServeConfig
from ..engine import Engine
from ..errors import ConfigError, TokenizerError
from . import logprobs as lp
from . import openai_api as oa
from .chat_api import ChatReply, parse_chat_request
from .engine_process import EngineExited, EngineProcess
from .inspect_api import register_inspect
from .jobs import Job, JobFailed, env_seconds, merge_deltas, next_or_500, submit_job
from .logprobs import Scored
from .metrics import CONTENT_TYPE, Metrics, StatusCounter
from .openai_api import APIError, CompletionRequest
from .tokenize_api import register_tokenize

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def create_app(
    engine: Engine,
    config: ServeConfig | None = None,
    *,
    model_id: str = "minigpt",
    template: ChatTemplate | None = None,
    batcher: Batcher | EngineProcess | None = None,
    **settings: Any,
) -> FastAPI:
    """The ASGI app serving `engine` under the name `model_id`, as `config` says; `settings` are
    ServeConfig fields by name over it (`create_app(engine, max_queue=8)`). `template`: the chat
    template already loaded (serve's, from the run), else config.chat_template's file, else the
    default. `batcher`: the one to decode on (`serve`'s: an EngineProcess); without it, a Batcher
    with its own thread in this process. The app closes it when it shuts down."""
    config = _with(config, settings)
    template = template or load_template(None, config.chat_template)
    stream_interval = (config.stream_interval if config.stream_interval is not None
                       else env_seconds("MINIGPT_STREAM_INTERVAL", 0.005))  # before the thread
    batcher = batcher or make_batcher(engine, config, start=True)
    metrics = Metrics(batcher.stats)
    created = oa.now()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPI(
        title="minigpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.batcher, app.state.stream_interval = batcher, stream_interval
    app.add_middleware(StatusCounter, metrics=metrics)
    _install_error_handlers(app)

    page = resources.files("minigpt.serve").joinpath("static/playground.html").read_text("utf-8")

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        if batcher.failure is not None:  # the engine process is gone: nothing can be generated
            return JSONResponse({"status": "error", "error": batcher.failure}, status_code=503)
        return JSONResponse({
            "status": "ok",
            "model": model_id,
            "auth": config.api_key is not None,
            "max_tokens_limit": config.max_tokens_limit,
            "max_concurrency": config.max_concurrency,
            "max_queue": config.max_queue,
            "running": batcher.running,
            "waiting": batcher.waiting,
        })

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    auth = _bearer_auth(config.api_key)
    read_body = partial(_read_body, limit=config.max_body_bytes)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [oa.model_object(model_id, created)]}

    @v1.get("/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{model_id}'",
                param="model",
                code="model_not_found",
            )
        return oa.model_object(model_id, created)

    async def generate(request: Request, req: CompletionRequest, param: str,
                       make_reply: Callable[[int, list[str]], Any]) -> Response:
        received = time.perf_counter()
        _check_fits(req.n, config.max_concurrency)
        # Encoding (and scoring an echoed prompt) is synchronous work proportional to the prompt:
        # keep it off the event loop too.
        prompt_ids = await asyncio.to_thread(_encode_prompts, engine, req.prompts, param)
        if req.constraint is not None:  # parsed and compiled here: milliseconds to seconds
            await asyncio.to_thread(_compile_constraint, engine, req)
        echoed = await asyncio.to_thread(_echo_scores, engine, req, prompt_ids)
        texts = _echo_texts(engine, req, prompt_ids)
        job = _submit(batcher, prompt_ids, req, stream_interval, texts, echoed, config.utf8_mask)
        job.timer = _Timer(metrics, received)
        reply = make_reply(sum(len(ids) for ids in prompt_ids), texts)
        if req.stream:
            return _GenerationStream(reply.sse(job), job)
        body = await _unless_disconnected(request, job, reply.collect(job))
        return JSONResponse(body) if body is not None else Response(status_code=499)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        data = oa.parse_json(await read_body(request))
        req = oa.parse_completion_request(data, model_id, config.max_tokens_limit)
        return await generate(request, req, "prompt", lambda prompt_tokens, texts: _Reply(
            oa.new_completion_id(), oa.now(), model_id, req, prompt_tokens, texts))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        data = oa.parse_json(await read_body(request))
        chat = parse_chat_request(data, model_id, config.max_tokens_limit, template)
        return await generate(request, chat.completion, "messages",
                              lambda prompt_tokens, _: ChatReply(chat, model_id, prompt_tokens))

    app.include_router(v1)
    register_inspect(app, engine, auth, read_body)
    register_tokenize(app, engine, model_id, template, auth, read_body)
    return app


def _with(config: ServeConfig | None, settings: dict[str, Any]) -> ServeConfig:
    """`config` (default: ServeConfig()) with `settings` by field name, validated."""
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(ServeConfig)})
    if unknown:
        raise ConfigError(f"unknown serve setting(s): {', '.join(unknown)}")
    return dataclasses.replace(config or ServeConfig(), **settings).validate()


# ---- generation (runs on the decoding thread) ---------------------------------------------------


def _check_fits(n: int, rows: int) -> None:
    if n > rows:
        raise APIError(400, f"n must be <= {rows}, the rows in this server's batch "
                       f"(--max-concurrency), got {n}", param="n", code="invalid_value")


def _echo_scores(engine: Engine, req: CompletionRequest,
                 prompt_ids: list[list[int]]) -> list[list[Scored]] | None:
    """With echo + logprobs: each prompt's tokens scored by the model (`Engine.score`); a
    token-id prompt has a score for every id sent, BOS included, as a client that sent them
    counts them (lm-evaluation-harness slices the list by its own token counts)."""
    if not (req.echo and req.logprobs is not None):
        return None
    return [lp.prompt_scores(engine, ids, req.logprobs, keep_bos=not isinstance(p, str))
            for p, ids in zip(req.prompts, prompt_ids)]


def _echo_texts(engine: Engine, req: CompletionRequest, prompt_ids: list[list[int]]) -> list[str]:
    """The text each prompt echoes: as sent, or its token ids decoded. Empty without echo."""
    if not req.echo:
        return ["" for _ in req.prompts]
    return [p if isinstance(p, str) else engine.tokenizer.decode(ids)
            for p, ids in zip(req.prompts, prompt_ids)]


def _submit(batcher: Batcher, prompt_ids: list[list[int]], req: CompletionRequest,
            stream_interval: float, texts: list[str], echoed: list[list[Scored]] | None = None,
            utf8_mask: bool | None = None) -> Job:
    bases = [len(t) for t in texts]  # text_offset counts an echoed prompt
    return submit_job(batcher, prompt_ids, req.sampling(utf8_mask), stream_interval, req.stop,
                      bases=bases, echoed=echoed)


class _Timer:
    """Time to first text and to the end of one request, into the /metrics histograms."""

    def __init__(self, metrics: Metrics, received: float):
        self.metrics, self.received, self.first = metrics, received, False

    def text(self) -> None:
        if not self.first:
            self.first = True
            self.metrics.ttft.observe(time.perf_counter() - self.received)

    def end(self) -> None:
        self.metrics.latency.observe(time.perf_counter() - self.received)


def _compile_constraint(engine: Engine, req: CompletionRequest) -> None:
    """Check and compile the request's constraint (the engine keeps it for the batcher's submit);
    a bad pattern, schema or grammar, or one this vocabulary cannot begin, is a 400."""
    try:
        engine.grammars.compile(req.constraint.validate())
    except ConfigError as e:
        raise APIError(400, str(e), param=req.constraint_param, code="invalid_value") from None


def _encode_prompts(engine: Engine, prompts: Sequence[Prompt],
                    param: str = "prompt") -> list[list[int]]:
    vocab = engine.tokenizer.vocab_size
    for p in prompts:
        bad = None if isinstance(p, str) else next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is out of range: this model's vocabulary "
                           f"is 0..{vocab - 1}", param=param, code="invalid_prompt")
    try:
        return [engine.encode_prompt(p) for p in prompts]
    except TokenizerError as e:
        what = "prompt" if param == "prompt" else "the chat prompt (messages in the chat template)"
        raise APIError(
            400,
            f"{what} cannot be encoded by this model's tokenizer: {e}",
            param=param,
            code="invalid_prompt",
        ) from None


# ---- responses --------------------------------------------------------------------------------


class _Reply:
    """Turns a job's deltas into a completion object or a stream of OpenAI chunks."""

    def __init__(
        self,
        completion_id: str,
        created: int,
        model_id: str,
        req: CompletionRequest,
        prompt_tokens: int,
        echo_texts: list[str],
    ):
        self.id, self.created, self.model_id = completion_id, created, model_id
        self.req = req
        self.prompt_tokens = prompt_tokens
        self.echo_texts = echo_texts
        self.choices = len(req.prompts) * req.n

    def _prompt_of(self, index: int) -> str:
        return self.echo_texts[index // self.req.n]

    def _logprobs(self, scores: list[Scored]) -> dict[str, Any] | None:
        return lp.completion_logprobs(scores) if self.req.logprobs is not None else None

    async def collect(self, job: Job) -> dict[str, Any]:
        texts = [self._prompt_of(i) if self.req.echo else "" for i in range(self.choices)]
        scores: list[list[Scored]] = [[] for _ in range(self.choices)]
        finish: list[str | None] = [None] * self.choices
        tokens = 0
        while (batch := await next_or_500(job)) is not None:
            for d in batch:
                texts[d.index] += d.text
                scores[d.index] += d.scores
                if d.finish_reason:
                    finish[d.index] = d.finish_reason
                    tokens += d.tokens
        choices = [oa.choice(i, texts[i], finish[i], self._logprobs(scores[i]))
                   for i in range(self.choices)]
        return oa.completion_object(
            self.id, self.created, self.model_id, choices, oa.usage(self.prompt_tokens, tokens)
        )

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        obj = oa.completion_object(self.id, self.created, self.model_id, choices, usage)
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def sse(self, job: Job) -> AsyncIterator[str]:
        if self.req.echo:
            for i in range(self.choices):
                yield self._chunk([oa.choice(i, self._prompt_of(i), None)])
        tokens = 0
        try:
            while (batch := await job.next_batch()) is not None:
                merged, done = merge_deltas(batch)
                tokens += done
                yield "".join(self._chunk([oa.choice(i, text, finish, self._logprobs(scores))])
                              for i, (text, finish, scores) in merged.items())
        except JobFailed as e:
            yield oa.stream_error(e.args[0])
            return
        if self.req.include_usage:
            yield self._chunk([], oa.usage(self.prompt_tokens, tokens))
        yield "data: [DONE]\n\n"


class _GenerationStream(StreamingResponse):
    """An SSE response that cancels its job however it ends: done, client gone, or server stopping.

    The client is watched for a disconnect the whole time, including while the job waits
    for rows and nothing is being sent, so a client that leaves never keeps its rows.
    """

    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope: Any, receive: Callable, send: Callable) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client closed the socket mid-send
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.job.cancel()
            await self.body_iterator.aclose()


async def _unless_disconnected(request: Request, job: Job, work: Any) -> Any:
    """Await `work`; if the client disconnects first, cancel the job and return None."""
    result = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await work
        finally:
            job.cancel()  # no-op when it finished; stops generating when this task was cancelled
            tg.cancel_scope.cancel()
    return result


# ---- auth, body, errors ---------------------------------------------------------------------------


def _bearer_auth(api_key: str | None) -> Callable[[Request], None]:
    expected = api_key.encode() if api_key is not None else None

    def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401,
                "Missing API key: send the header 'Authorization: Bearer KEY'",
                code="missing_api_key",
            )
        # compare_digest takes time independent of where the strings differ: no timing oracle.
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    return check


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise APIError(
                413,
                f"request body is {int(declared)} bytes; the limit is {limit}",
                code="request_too_large",
            )
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked uploads declare no length: count as they come
        size += len(chunk)
        if size > limit:
            raise APIError(
                413, f"request body exceeds the limit of {limit} bytes", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _install_error_handlers(app: FastAPI) -> None:
    def reply(status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(BatcherBusy)
    async def busy(_: Request, e: BatcherBusy) -> JSONResponse:  # every row and the line taken
        return reply(429, APIError(429, str(e), code="server_busy", type="server_busy").body(),
                     {"Retry-After": "1"})

    @app.exception_handler(EngineExited)
    async def engine_gone(_: Request, e: EngineExited) -> JSONResponse:
        return reply(503, oa.error_body(str(e), "server_error"))

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, _: ClientDisconnect) -> Response:
        # a client that gave up mid-upload (lm-eval's retries do) is news, not a server fault
        logging.getLogger("uvicorn.error").info(
            "client disconnected while sending its request body: %s %s", request.method,
            request.url.path)
        return Response(status_code=499)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return reply(e.status, e.body(), headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return reply(e.status_code, oa.error_body(str(e.detail), code=code), e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return reply(400, oa.error_body(f"invalid request: {e.errors()}"))

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        return reply(500, oa.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))


# ---- running it -----------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 = any free port); errors name the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _announce(sock: socket.socket, host: str, model_id: str, step: int | None,
              api_key: str | None) -> None:
    """Print where the server listens (and warn when it listens beyond loopback with no key)."""
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if api_key is None and host not in LOOPBACK:
        print(
            f"minigpt: warning: serving on {host} without an API key: anyone who can reach "
            "this port can use the model (set --api-key or MINIGPT_API_KEY)",
            file=sys.stderr,
        )
    print(
        f"minigpt: serving model '{model_id}' (step {step}) on http://{shown}:{bound_port} "
        f"({'API key required' if api_key else 'no API key'}); playground at "
        f"http://{shown}:{bound_port}/",
        flush=True,
    )


def make_batcher(engine: Engine, config: ServeConfig, start: bool) -> Batcher:
    return Batcher(engine, max_rows=config.max_concurrency, max_queue=config.max_queue,
                   start=start, prompt_cache=config.prompt_cache, compile=config.compile)


class _Server(uvicorn.Server):
    """uvicorn's, except that the signal that stopped it is not raised again once it has shut down
    (uvicorn does, for the exit status a signal gives): `minigpt serve` stopped by Ctrl-C or
    SIGTERM ends with its own last line and status 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            getattr(self, "_captured_signals", []).clear()


def serve(
    run_dir: str | Path,
    config: ServeConfig | None = None,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    dtype: str = "auto",
    log_level: str = "info",
    engine_process: EngineProcess | None = None,
    **settings: Any,
) -> None:
    """Load a run and serve it until Ctrl-C (or SIGTERM), which stops it cleanly. `config` and
    `settings` as for create_app; the chat template defaults to the run's chat_template.json.
    `engine_process`: one already started for this run and config (the CLI starts it before it
    imports torch), else one is started here.

    Decoding runs in a process of its own (`engine_process`), whose main thread has the GIL to
    itself; this process serves HTTP (docs/server.md, "Concurrency: continuous batching")."""
    from ..engine import load

    config = _with(config, settings)  # bad settings fail before the model loads
    # the engine process loads the run while this process loads its own copy
    batcher = engine_process or EngineProcess.for_serving(run_dir, config, checkpoint=checkpoint,
                                                         device=device, dtype=dtype)
    try:
        template = load_template(run_dir, config.chat_template)  # a bad one: before the load
        engine = load(run_dir, checkpoint=checkpoint, device=device, dtype=dtype)
        model_id = Path(run_dir).resolve().name
        sock = bind_socket(config.host, config.port)
        if batcher is not None:
            batcher.connect(engine)
        app = create_app(engine, config, model_id=model_id, template=template, batcher=batcher)
        _announce(sock, config.host, model_id, engine.step, config.api_key)
        server = _Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        if batcher is not None:
            batcher.close()  # the app's shutdown closes it too; this also covers a failed start
    print("minigpt: server stopped", flush=True)
