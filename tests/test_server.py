"""`minigpt serve`: real uvicorn servers on ephemeral 127.0.0.1 ports, driven by the official `openai`
client, raw HTTP (httpx), the CLI, and the playground page in a real Chromium (Playwright)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from minigpt import load, train
from minigpt.cli import main
from minigpt.config import ServeConfig
from minigpt.errors import ConfigError
from minigpt.serve import openai_api as oa
from minigpt.serve.app import bind_socket, create_app

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = "sk-test-123"
CHROMIUM = Path("/usr/bin/chromium")
CORPUS = "".join(
    f"the cat sat on the mat {i}. the dog ran to the log {i % 7}; a bird sang.\n"
    for i in range(120)
)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "corpus.txt").write_text(CORPUS)
    out = tmp / "tiny"
    train(
        data=str(tmp / "corpus.txt"),
        out=str(out),
        progress=False,
        device="cpu",
        n_layer=2,
        n_head=4,
        n_embd=32,
        block_size=32,
        max_iters=12,
        batch_size=8,
        eval_interval=12,
        eval_iters=1,
        sample_tokens=0,
    )
    return out


@pytest.fixture(scope="session")
def engine(run_dir):
    return load(run_dir, device="cpu")


@contextmanager
def serving(app):
    """Run `app` on uvicorn in a thread on 127.0.0.1:<free port>; always shut it down."""
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="module")
def url(engine):
    app = create_app(
        engine, model_id="tiny", api_key=KEY, max_tokens_limit=256, max_body_bytes=64 * 1024
    )
    with serving(app) as base:
        yield base


class FirstTokenGate:
    """The real engine, except that generation pauses after the first token until `go` is set.
    The test sets it once it has *seen* that first token arrive, so "the text streamed in pieces"
    is shown by an event, not by generation happening to be slower than the network.

    The batcher turns every token into text with `tokenizer.token_bytes` on its own thread, so the
    gate holds it there at the second token: the first has been sent on by then. Only the batcher
    thread is held: the event loop names tokens with it too (logprobs, e.g. the playground's)."""

    def __init__(self, engine):
        self.engine = engine
        self.go = threading.Event()
        self.tokenizer = _GatedTokenizer(engine.tokenizer, self.go)

    def __getattr__(self, name):
        return getattr(self.engine, name)


class _GatedTokenizer:
    def __init__(self, tokenizer, go):
        self.tokenizer, self.go, self.calls = tokenizer, go, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def token_bytes(self, token):
        if threading.current_thread().name != "minigpt-batcher":
            return self.tokenizer.token_bytes(token)  # the event loop naming tokens for logprobs
        self.calls += 1
        if self.calls == 2:
            assert self.go.wait(60), "the test never released the first token"
        return self.tokenizer.token_bytes(token)


@pytest.fixture
def gated(engine):
    """(server url, gate): a server whose generations wait at their first token for the test."""
    gate = FirstTokenGate(engine)
    with serving(create_app(gate, model_id="tiny", api_key=KEY)) as base:
        try:
            yield base, gate
        finally:
            gate.go.set()  # never leave a worker waiting while the server shuts down


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def complete(client, **kw):
    return client.completions.create(model="tiny", prompt=kw.pop("prompt", "the "), **kw)


def stream_texts(client, **kw) -> tuple[dict[int, str], dict[int, str], int]:
    """Stream a completion; return per-choice text, per-choice finish_reason, number of chunks."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = 0
    for chunk in complete(client, stream=True, **kw):
        chunks += 1
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, chunks


# ---- the openai client ----------------------------------------------------------------------------


def test_completion_is_the_models_greedy_continuation(client, engine):
    r = complete(client, max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny"
    [choice] = r.choices
    assert choice.text == engine.generate("the ", max_new_tokens=20, temperature=0)
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len("the ")
    assert r.usage.completion_tokens == 20
    assert r.usage.total_tokens == 24


def test_streaming_arrives_in_pieces_and_matches_the_plain_completion(client, gated):
    base, gate = gated
    stream = complete(openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60),
                      stream=True, max_tokens=30, temperature=0)
    first = next(iter(stream))  # arrives while generation is held after the first token
    assert len(first.choices[0].text) == 1
    gate.go.set()
    rest = list(stream)
    streamed = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
    plain = complete(client, max_tokens=30, temperature=0).choices[0].text
    assert streamed == plain and len(plain) == 30
    assert rest[-1].choices[0].finish_reason == "length"


def test_stream_usage_chunk_when_asked(client):
    chunks = list(
        complete(
            client, stream=True, max_tokens=7, temperature=0, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 7


def test_n_choices_are_the_engines_batched_samples(client, engine):
    r = complete(client, max_tokens=12, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == engine.generate_many("the ", 3, max_new_tokens=12, seed=7)
    # usage counts tokens, not characters: a barely trained model may sample BOS (no text) or EOS
    events = engine.stream("the ", max_new_tokens=12, seed=7, num_samples=3)
    assert r.usage.completion_tokens == sum(e.token is not None for e in events)
    texts, finish, _ = stream_texts(client, max_tokens=12, n=3, seed=7)
    assert texts == {c.index: c.text for c in r.choices}
    assert finish == {c.index: c.finish_reason for c in r.choices}


def test_list_of_prompts_gives_choices_in_prompt_order(client, engine):
    r = complete(client, prompt=["the ", "a bird "], max_tokens=8, n=2, temperature=0)
    texts = [c.text for c in r.choices]
    assert texts[:2] == [engine.generate("the ", max_new_tokens=8, temperature=0)] * 2
    assert texts[2:] == [engine.generate("a bird ", max_new_tokens=8, temperature=0)] * 2


def test_stop_string_cuts_the_text_before_it(client):
    full = complete(client, max_tokens=40, temperature=0).choices[0].text
    stop = full[10:13]
    cut = full[: full.find(stop)]
    r = complete(client, max_tokens=40, temperature=0, stop=[stop, "never-seen"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert r.usage.completion_tokens < 40
    texts, finish, _ = stream_texts(client, max_tokens=40, temperature=0, stop=stop)
    assert (texts, finish) == ({0: cut}, {0: "stop"})


def test_seed_reproduces_and_different_seeds_differ(client):
    def texts(seed):
        return [c.text for c in complete(client, max_tokens=40, n=4, seed=seed).choices]

    a, b, c = texts(11), texts(11), texts(12)
    assert a == b
    assert a != c


def test_echo_prepends_the_prompt(client, engine):
    r = complete(client, prompt="the dog", max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == "the dog" + engine.generate(
        "the dog", max_new_tokens=5, temperature=0
    )


def test_token_id_prompts_decode_as_their_text_does(client, engine):
    """OpenAI's token-id forms (a list of ids, a list of such lists) continue exactly as the text
    they encode; echo gives back their text, and with logprobs a score for every id sent."""
    ids = engine.encode_prompt("the dog")
    want = engine.generate("the dog", max_new_tokens=6, temperature=0)
    one = complete(client, prompt=ids, max_tokens=6, temperature=0)
    many = complete(client, prompt=[ids, engine.encode_prompt("a bird")], max_tokens=6,
                    temperature=0)
    assert one.choices[0].text == many.choices[0].text == want
    assert many.choices[1].text == engine.generate("a bird", max_new_tokens=6, temperature=0)
    assert one.usage.prompt_tokens == len(ids)
    echo = complete(client, prompt=[engine.tokenizer.bos_id, *ids], max_tokens=1, temperature=0,
                    echo=True, logprobs=1)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith("the dog")
    assert len(lp.token_logprobs) == len(ids) + 2  # BOS, the prompt, the one generated token
    assert lp.token_logprobs[0] is None and lp.tokens[0] == "<|bos|>"
    scores = engine.score([engine.tokenizer.bos_id, *ids], 1)
    assert lp.token_logprobs[1:-1] == pytest.approx([s for s, _ in scores[1:]], abs=1e-6)


def test_min_p_samples_as_the_engine_does(client, engine):
    got = complete(client, max_tokens=20, seed=5, temperature=1.0, extra_body={"min_p": 0.2})
    assert got.choices[0].text == engine.generate("the ", max_new_tokens=20, seed=5,
                                                  temperature=1.0, min_p=0.2)
    # min_p 1 keeps only the most likely token: greedy, where plain sampling is not
    only_top = complete(client, max_tokens=20, seed=5, temperature=1.0, extra_body={"min_p": 1})
    greedy = engine.generate("the ", max_new_tokens=20, temperature=0)
    assert only_top.choices[0].text == greedy != engine.generate(
        "the ", max_new_tokens=20, seed=5, temperature=1.0)


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_wrong_or_missing_key_is_rejected(url):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.completions.create(model="tiny", prompt="the ", max_tokens=3)
    assert exc.value.status_code == 401
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "the "})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").json()["auth"] is True  # health and playground stay open


def test_concurrent_streams_are_not_mixed_up(client, engine):
    seeds = list(range(100, 108))
    with ThreadPoolExecutor(len(seeds)) as pool:
        got = list(pool.map(lambda s: stream_texts(client, max_tokens=25, seed=s)[0][0], seeds))
    assert got == [engine.generate("the ", max_new_tokens=25, seed=s) for s in seeds]


# ---- bad requests: 4xx with an OpenAI-style error, and the server lives on ------------------------

BAD_REQUESTS = [
    # (case, body, expected status, expected error.param)
    ("malformed json", b'{"prompt": "the ", "max_tokens": ', 400, None),
    ("not an object", b'["the "]', 400, None),
    ("NaN", b'{"prompt": "the ", "temperature": NaN}', 400, None),
    ("not utf-8", b'{"prompt": "\xff\xfe"}', 400, None),
    ("max_tokens string", {"max_tokens": "10"}, 400, "max_tokens"),
    ("max_tokens float", {"max_tokens": 2.5}, 400, "max_tokens"),
    ("max_tokens bool", {"max_tokens": True}, 400, "max_tokens"),
    ("temperature string", {"temperature": "hot"}, 400, "temperature"),
    ("prompt number", {"prompt": 5}, 400, "prompt"),
    ("prompt token id out of range", {"prompt": [1, 2, 100_000]}, 400, "prompt"),
    ("prompt token id negative", {"prompt": [[1, 2], [-1]]}, 400, "prompt"),
    ("prompt empty token list", {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("prompt ids and text mixed", {"prompt": ["the ", [1, 2]]}, 400, "prompt"),
    ("prompt token id bool", {"prompt": [1, True]}, 400, "prompt"),
    ("stream string", {"stream": "yes"}, 400, "stream"),
    ("stop number", {"stop": 3}, 400, "stop"),
    ("seed bool", {"seed": True}, 400, "seed"),
    ("n float", {"n": 1.5}, 400, "n"),
    ("temperature < 0", {"temperature": -0.1}, 400, "temperature"),
    ("temperature > 2", {"temperature": 2.5}, 400, "temperature"),
    ("top_p 0", {"top_p": 0}, 400, "top_p"),
    ("top_p > 1", {"top_p": 1.5}, 400, "top_p"),
    ("top_k < 0", {"top_k": -1}, 400, "top_k"),
    ("min_p > 1", {"min_p": 1.5}, 400, "min_p"),
    ("min_p string", {"min_p": "0.1"}, 400, "min_p"),
    ("n 0", {"n": 0}, 400, "n"),
    ("n huge", {"n": 1000}, 400, "n"),
    ("max_tokens 0", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens above limit", {"max_tokens": 257}, 400, "max_tokens"),
    ("seed negative", {"seed": -1}, 400, "seed"),
    ("five stop strings", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("empty stop string", {"stop": ""}, 400, "stop"),
    ("unknown field", {"temprature": 0.5}, 400, "temprature"),
    ("logprobs above 20", {"logprobs": 21}, 400, "logprobs"),
    ("logprobs bool", {"logprobs": True}, 400, "logprobs"),
    ("wrong model", {"model": "gpt-4"}, 404, "model"),
    ("unencodable characters", {"prompt": "the snowman \u2603 sat"}, 400, "prompt"),
    # structured output (docs/structured.md)
    ("invalid regex", {"structured_outputs": {"regex": "K[a-"}}, 400, "structured_outputs"),
    ("invalid grammar", {"structured_outputs": {"grammar": "root ::= x"}}, 400,
     "structured_outputs"),
    ("invalid JSON schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"type": "strin"}}}}, 400, "response_format"),
    ("json_schema without schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "r"}}}, 400, "response_format.json_schema.schema"),
    ("response_format type", {"response_format": {"type": "xml"}}, 400, "response_format"),
    ("response_format and structured_outputs", {"response_format": {"type": "json_object"},
     "structured_outputs": {"regex": "a"}}, 400, "structured_outputs"),
    ("two structured_outputs", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, 400,
     "structured_outputs"),
    ("empty choice", {"structured_outputs": {"choice": []}}, 400, "structured_outputs.choice"),
    ("unknown structured_outputs field", {"structured_outputs": {"regexp": "a"}}, 400,
     "structured_outputs"),
    ("schema the vocabulary cannot begin", {"response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("oversized body", {"prompt": "the " * 20_000}, 413, None),
]


@pytest.mark.parametrize("case,body,status,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_openai_error_and_server_lives(url, case, body, status, param):
    if isinstance(body, dict):
        body = json.dumps({"model": "tiny", "prompt": "the ", **body}).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/completions", content=body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] and error["param"] == param
    ok = httpx.post(
        f"{url}/v1/completions", headers=headers, json={"prompt": "the ", "max_tokens": 2}
    )
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_oversized_chunked_body_without_length_is_refused(url):
    def body():  # a generator body is sent chunked, with no Content-Length to check up front
        for _ in range(100):
            yield b" " * 1024

    r = httpx.post(
        f"{url}/v1/completions", content=body(), headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{url}/health").status_code == 200


def test_unknown_route_gets_openai_error(url):
    r = httpx.get(f"{url}/v1/chat/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


# ---- rows: bounded concurrency, disconnects free their rows - --------------------------------------


def wait_for(url, predicate, timeout=15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health").json()
        if predicate(health):
            return health
        assert time.monotonic() < deadline, f"timed out; last /health: {health}"
        time.sleep(0.05)


def test_disconnect_frees_the_slot(engine):
    app = create_app(
        engine, model_id="tiny", max_tokens_limit=1_000_000, max_concurrency=1, max_queue=1
    )
    long = {"prompt": "the ", "max_tokens": 1_000_000, "stream": True, "temperature": 0}
    with serving(app) as url, httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        with a.stream("POST", f"{url}/v1/completions", json=long) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # generating
            with b.stream("POST", f"{url}/v1/completions", json=long) as second:
                assert second.status_code == 200
                wait_for(url, lambda h: h["running"] == 1 and h["waiting"] == 1)
                busy = httpx.post(f"{url}/v1/completions", json={"prompt": "the "})
                assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy"
            # the waiting client left before it got a slot: it no longer holds a place in line
            wait_for(url, lambda h: h["running"] == 1 and h["waiting"] == 0)
        wait_for(url, lambda h: h["running"] == 0 and h["waiting"] == 0)
        # a non-streaming client that gives up frees its slot too
        body = json.dumps({**long, "stream": False}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_for(url, lambda h: h["running"] == 1)
        wait_for(url, lambda h: h["running"] == 0)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the ", "max_tokens": 3})
        assert r.status_code == 200


def test_a_client_gone_mid_body_is_one_log_line_not_a_traceback(engine):
    records: list[logging.LogRecord] = []
    seen = threading.Event()

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)
            if "disconnected" in record.getMessage():
                seen.set()

    with serving(create_app(engine, model_id="tiny")) as url:
        log = logging.getLogger("uvicorn.error")
        handler, level = Collect(), log.level
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as raw:  # 10 of 1,000 bytes, then gone
                raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                            b"application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\":")
            assert seen.wait(20), [r.getMessage() for r in records]
            assert httpx.post(f"{url}/v1/completions", json={"max_tokens": 2}).status_code == 200
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in records if "disconnected" in r.getMessage()] == [
        "client disconnected while sending its request body: POST /v1/completions"]


# ---- the CLI --------------------------------------------------------------------------------------


def engine_processes(pid: int) -> list[int]:
    """Live engine processes that `pid` started (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        cmdline = (stat.parent / "cmdline").read_bytes() if stat.parent.exists() else b""
        if int(fields[1]) == pid and fields[0] != "Z" and b"engine_process" in cmdline:
            found.append(int(stat.parent.name))
    return found


# where the engine process cannot start (Windows), the server decodes on a thread of its own
WITHOUT_ENGINE_PROCESS = ("import sys; from minigpt.serve import engine_process; "
                          "engine_process.SUPPORTED = False; from minigpt.cli import main; "
                          "sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("stop,engines", [(signal.SIGINT, 1), (signal.SIGTERM, 1),
                                          (signal.SIGINT, 0)],
                         ids=["ctrl-c", "sigterm", "ctrl-c-without-engine-process"])
def test_cli_serve_reads_key_from_env_generates_and_stops_on_signal(run_dir, stop, engines):
    env = {**os.environ, "PYTHONPATH": str(SRC), "MINIGPT_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    launch = ["-m", "minigpt"] if engines else ["-c", WITHOUT_ENGINE_PROCESS]
    proc = subprocess.Popen(
        [sys.executable, *launch, "serve", str(run_dir), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "API key required" in line, line + proc.stderr.read()
        base = line.split(" on ")[1].split()[0]
        assert base.startswith("http://127.0.0.1:")
        wait_for(base, lambda h: h["status"] == "ok")
        assert httpx.get(f"{base}/v1/models").status_code == 401
        models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert models.json()["data"][0]["id"] == run_dir.name
        # decoded by the engine process (or, without one, a thread of the server)
        done = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": "the ", "max_tokens": 5, "temperature": 0}, timeout=60)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 5
        started = engine_processes(proc.pid)
        assert len(started) == engines
        proc.send_signal(stop)
        assert proc.wait(30) == 0
        assert "server stopped" in proc.stdout.read()
        assert not any(Path(f"/proc/{pid}").exists() for pid in started)  # none left behind
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_missing_run_is_one_line_error(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minigpt: error:") and len(err.strip().splitlines()) == 1


# ---- the playground in a real browser -------------------------------------------------------------

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's Chromium at /usr/bin/chromium "
    "(apt-get install chromium; .ci/run installs it)",
)
def test_playground_streams_a_completion_in_the_browser(gated, client):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            url, gate = gated
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#model")).to_contain_text("tiny")
            expect(page.locator("#api-key")).to_be_visible()  # this server wants a key

            page.fill("#api-key", "sk-wrong")
            page.fill("#prompt", "the ")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("Incorrect API key")

            page.fill("#api-key", KEY)
            page.fill("#max-tokens", "40")
            page.focus("#temperature")
            page.keyboard.press("Home")  # slider to 0: greedy, so no early end-of-text
            expect(page.locator("#temperature-value")).to_have_text("0")
            page.click("#generate")
            # the first token is on the page while the rest is still held back: a stream
            expect(page.locator("#output")).to_have_attribute("data-chunks", "1", timeout=30_000)
            expect(page.locator("#completion")).to_have_text(complete(client, max_tokens=1,
                                                                     temperature=0).choices[0].text)
            gate.go.set()
            expect(page.locator("#status")).to_contain_text("done", timeout=30_000)
            shown = page.locator("#completion").text_content()
            chunks = int(page.locator("#output").get_attribute("data-chunks"))
        finally:
            browser.close()
    # the page used the API with its controls: same text as the openai client with the same settings
    expected = complete(client, max_tokens=40, temperature=0)
    assert shown == expected.choices[0].text and len(shown) == 40
    assert chunks >= 2  # it arrived as a stream, not in one piece


def test_the_serve_config_reaches_the_batcher_and_health(engine):
    app = create_app(engine, ServeConfig(max_concurrency=3, max_queue=2), stream_interval=0.25)
    batcher = app.state.batcher
    try:
        assert (batcher.max_rows, batcher.max_queue) == (3, 2)
        assert app.state.stream_interval == 0.25
    finally:
        batcher.close()
    with pytest.raises(ConfigError, match="unknown serve setting.s.: max_tokens"):
        create_app(engine, max_tokens=3)
    with pytest.raises(ConfigError, match="--max-queue must be >= 0, got -1"):
        create_app(engine, max_queue=-1)


def test_a_parsed_request_is_what_the_client_sent_bounded_by_the_servers_limit():
    req = oa.parse_completion_request({"prompt": "a"}, "m", 1024)
    assert req.max_tokens == oa.DEFAULT_MAX_TOKENS
    with pytest.raises(dataclasses.FrozenInstanceError):  # nothing writes server settings into it
        req.max_tokens = 3
    # the default a request gets fits the server's limit too, as chat's always did
    assert oa.parse_completion_request({"prompt": "a"}, "m", 4).max_tokens == 4
    with pytest.raises(oa.APIError, match="max_tokens must be between 1 and 4, got 5"):
        oa.parse_completion_request({"prompt": "a", "max_tokens": 5}, "m", 4)
    # the server's UTF-8 mask joins only in the engine's settings
    assert req.sampling(False).utf8_mask is False and req.sampling().utf8_mask is None
