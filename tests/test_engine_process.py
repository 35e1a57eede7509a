"""`minigpt serve` decodes in a process of its own (serve/engine_process.py): what comes back over
the pipe is what the same batcher gives in this process; the waiting line's limit holds on the HTTP
side; closing ends every request and the process; an engine that dies is an error, not a hang."""

from __future__ import annotations

import threading

import httpx
import pytest

from minigpt.batching import BatcherBusy
from minigpt.engine import load
from minigpt.serve.app import create_app
from minigpt.serve.engine_process import EngineExited, EngineProcess
from test_server import run_dir, serving  # noqa: F401  (run_dir: the trained run, a fixture)


def start(run, **limits) -> EngineProcess:
    settings = dict(max_rows=4, max_queue=4, prompt_cache=0) | limits
    process = EngineProcess(run, checkpoint="best", device="cpu", dtype="auto", **settings)
    return process.connect(load(run, device="cpu"))


def collect(req) -> tuple[str, list[int], list[str | None]]:
    """Wait on the request's notifications until it ends -> (text, tokens, finish reasons)."""
    woken = threading.Event()
    req._notify = woken.set
    text, tokens, reasons = "", [], []
    while True:
        events, done = req.drain()
        for ev in events:
            text += ev.text
            tokens += [ev.token] if ev.token is not None else []
            reasons.append(ev.finish_reason)
        if done:
            return text, tokens, [r for r in reasons if r]
        woken.wait(60)
        woken.clear()


@pytest.fixture(scope="module")
def remote(run_dir):  # noqa: F811
    engine = start(run_dir)
    yield engine
    engine.close()


def test_the_engine_process_decodes_what_this_process_decodes(remote, run_dir):  # noqa: F811
    local = load(run_dir, device="cpu")
    for settings in (dict(temperature=0), dict(temperature=0.9, seed=7, top_k=20)):
        settings["stop_at_eos"] = False  # every request runs to its limit, whatever the model
        want = local.generate("the ", max_new_tokens=24, **settings)
        got = collect(remote.submit("the ", max_new_tokens=24, **settings))
        assert got[0] == want
        assert got[2] == ["length"]
    two = remote.submit("the ", max_new_tokens=10, temperature=0.9, seed=3, num_samples=2,
                        stop_at_eos=False)
    text, tokens, reasons = collect(two)
    assert len(tokens) == 20 and reasons == ["length", "length"]
    assert remote.stats()["tokens_generated"] >= 68 and remote.running == 0


def test_a_bad_request_fails_on_this_side_before_it_is_sent(remote):
    with pytest.raises(Exception, match="stop strings must be non-empty"):
        remote.submit("the ", stop=[""])
    with pytest.raises(Exception, match="more rows than the batch has"):
        remote.submit("the ", num_samples=5)


def test_the_waiting_line_is_full_at_max_queue_and_frees_as_requests_end(run_dir):  # noqa: F811
    engine = start(run_dir, max_rows=1, max_queue=1)
    try:
        first = engine.submit("the ", max_new_tokens=100_000, stop_at_eos=False)
        second = engine.submit("the ", max_new_tokens=100_000, stop_at_eos=False)
        assert (engine.running, engine.waiting) == (1, 1)
        with pytest.raises(BatcherBusy, match="1 requests are already waiting"):
            engine.submit("the ", max_new_tokens=5)
        second.cancel()
        first.cancel()
        assert collect(second)[2] == [] and collect(first)[2] == []
        assert (engine.running, engine.waiting) == (0, 0)
        # an unseeded sample may end at EOS within 5 tokens: only the length may end this one
        assert collect(engine.submit("the ", max_new_tokens=5, stop_at_eos=False))[2] == ["length"]
    finally:
        engine.close()


def test_closing_ends_running_requests_and_the_process(run_dir):  # noqa: F811
    engine = start(run_dir)
    req = engine.submit("the ", max_new_tokens=100_000, stop_at_eos=False)
    engine.close()
    text, tokens, reasons = collect(req)  # ended, with no error
    assert engine._process.poll() is not None  # it has exited
    with pytest.raises(BatcherBusy, match="shutting down"):
        engine.submit("the ")


def test_an_engine_that_dies_fails_its_requests_and_the_server_says_so(run_dir):  # noqa: F811
    engine = start(run_dir)
    app = create_app(engine.engine, batcher=engine)
    with serving(app) as base:
        running = engine.submit("the ", max_new_tokens=100_000, stop_at_eos=False)
        engine._process.kill()
        with pytest.raises(EngineExited, match="engine process exited"):
            collect(running)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "the ", "max_tokens": 3})
        assert r.status_code == 503 and "restart the server" in r.json()["error"]["message"]
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and health.json()["status"] == "error"


def test_serve_compile_builds_the_compiled_step_in_the_engine_process(run_dir, capfd):  # noqa: F811
    """`minigpt serve --compile` (ServeConfig.compile) reaches the engine process's batcher, which
    says how long compiling took; a lone request then decodes what eager decoding gives."""
    remote = start(run_dir, compile=True)
    try:
        settings = dict(max_new_tokens=24, temperature=0, stop_at_eos=False)
        want = load(run_dir, device="cpu").generate("the ", **settings)
        assert collect(remote.submit("the ", **settings))[0] == want
    finally:
        remote.close()
    assert "minigpt: compiled the one-row decode step in" in capfd.readouterr().err
