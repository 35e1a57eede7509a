"""The server on continuous batching: concurrent requests share one batch and still get their
single-stream text, `n` is bounded by the batch, and `GET /metrics` reads back as Prometheus text."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import torch
from prometheus_client.parser import text_string_to_metric_families

from minigpt.config import ModelConfig
from minigpt.engine import Engine
from minigpt.model import GPT
from minigpt.serve.app import create_app
from minigpt.tokenization import CharTokenizer
from test_server import serving, wait_for


def tiny_engine() -> Engine:
    tok = CharTokenizer.train(["the cat sat on a mat.\n"])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2,
                            n_embd=16, arch="modern"))
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.3)
    return Engine(model, tok)


class HoldFirstToken:
    """The engine, with the batcher held at its first token until `go` is set, so the test can
    line up every request before any of them decodes: they then share the batch by construction."""

    def __init__(self, engine):
        self.engine, self.go, self.calls = engine, threading.Event(), 0
        self.tokenizer = self

    def __getattr__(self, name):
        engine_side = name in ("encode_prompt", "utf8_masking", "utf8_table")
        return getattr(self.engine if engine_side else self.engine.tokenizer, name)

    @property
    def model(self):
        return self.engine.model

    @property
    def block_size(self):
        return self.engine.block_size

    @property
    def device(self):
        return self.engine.device

    def token_bytes(self, token):
        if threading.current_thread().name != "minigpt-batcher":
            return self.engine.tokenizer.token_bytes(token)  # naming tokens for logprobs
        self.calls += 1
        if self.calls == 1:
            assert self.go.wait(60), "the test never released the batch"
        return self.engine.tokenizer.token_bytes(token)


def metrics(url: str) -> dict[str, list]:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(samples, name, **labels):
    return sum(s.value for s in samples if s.name == name and all(
        s.labels.get(k) == v for k, v in labels.items()))


def test_concurrent_requests_share_the_batch_and_get_their_single_stream_text():
    engine = tiny_engine()
    gate = HoldFirstToken(engine)
    jobs = [("the ", 30, 0.0, None), ("a mat", 9, 0.0, None), ("cat", 21, 0.9, 4), ("", 14, 1.0, 5)]
    with serving(create_app(gate, model_id="tiny", max_concurrency=8)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)

        def run(job):
            prompt, n, temperature, seed = job
            texts = {}
            for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                                   temperature=temperature, seed=seed,
                                                   stream=True):
                for c in chunk.choices:
                    texts[c.index] = texts.get(c.index, "") + c.text
            return texts[0]

        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(run, job) for job in jobs]
            wait_for(url, lambda h: h["running"] == len(jobs))  # all in, the first one held
            gate.go.set()
            got = [f.result() for f in futures]
        m = metrics(url)
    want = [engine.generate(p, max_new_tokens=n, temperature=t, seed=s, stop_at_eos=True)
            for p, n, t, s in jobs]
    assert got == want
    steps = value(m["minigpt_decode_steps"], "minigpt_decode_steps_total")
    rows = value(m["minigpt_decode_row_steps"], "minigpt_decode_row_steps_total")
    assert rows > steps > 0  # more than one row per decode step: they really were batched


def test_metrics_read_back_with_prometheus_parser():
    engine = tiny_engine()
    with serving(create_app(engine, model_id="tiny", max_concurrency=3, max_queue=5)) as url:
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "the ", "max_tokens": 5,
                                                       "n": 2, "temperature": 0})
        assert ok.status_code == 200
        stream = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 4,
                                                           "stream": True, "seed": 1})
        assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
        bad = httpx.post(f"{url}/v1/completions", json={"prompt": "the ", "max_tokens": "9"})
        assert bad.status_code == 400
        too_many = httpx.post(f"{url}/v1/completions", json={"prompt": "the ", "n": 4})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
        m = metrics(url)
    requests = m["minigpt_requests"]
    assert value(requests, "minigpt_requests_total", endpoint="/v1/completions", status="200") == 2
    assert value(requests, "minigpt_requests_total", endpoint="/v1/completions", status="400") == 2
    generated = ok.json()["usage"]["completion_tokens"] + 4
    assert value(m["minigpt_generated_tokens"], "minigpt_generated_tokens_total") == generated
    assert value(m["minigpt_requests_running"], "minigpt_requests_running") == 0
    assert value(m["minigpt_requests_waiting"], "minigpt_requests_waiting") == 0
    assert value(m["minigpt_batch_rows_in_use"], "minigpt_batch_rows_in_use") == 0
    assert value(m["minigpt_batch_rows"], "minigpt_batch_rows") == 3
    for hist in ("minigpt_time_to_first_token_seconds", "minigpt_request_latency_seconds"):
        assert value(m[hist], f"{hist}_count") == 2
        assert value(m[hist], f"{hist}_bucket", le="+Inf") == 2


def test_text_ready_while_the_client_is_not_reading_goes_out_as_one_chunk():
    """Coalescing, shown without a clock: ten tokens are generated (stepping the batcher by hand)
    before the stream is read, and they leave as one chunk, not ten."""
    from minigpt.batching import Batcher
    from minigpt.serve import openai_api as oa
    from minigpt.serve.app import _Reply, _Timer
    from minigpt.serve.jobs import Job
    from minigpt.serve.metrics import Metrics

    engine = tiny_engine()
    batcher = Batcher(engine, max_rows=2, start=False)
    req = oa.CompletionRequest(prompts=["the "], max_tokens=10, temperature=0.0, stream=True)

    async def scenario():
        job = Job(asyncio.get_running_loop(), 1, 0.0)
        job.requests.append(batcher.submit(engine.encode_prompt("the "), req.sampling(),
                                           notify=job.notify))
        for _ in range(10):
            batcher.step()
        job.timer = _Timer(Metrics(lambda: {}), 0.0)
        reply = _Reply("cmpl-1", 0, "tiny", req, 4, [""])
        return [part async for part in reply.sse(job)]

    parts = asyncio.run(scenario())
    events = [e for part in parts for e in part.split("\n\n") if e]
    assert len(events) == 2 and events[-1] == "data: [DONE]"
    choice = json.loads(events[0].removeprefix("data: "))["choices"][0]
    assert choice["text"] == engine.generate("the ", max_new_tokens=10, temperature=0)
    assert choice["finish_reason"] == "length"


def test_a_bad_stream_interval_is_a_config_error(monkeypatch):
    import pytest

    from minigpt.errors import ConfigError

    monkeypatch.setenv("MINIGPT_STREAM_INTERVAL", "soon")
    with pytest.raises(ConfigError, match="MINIGPT_STREAM_INTERVAL must be a number of seconds"):
        create_app(tiny_engine())
