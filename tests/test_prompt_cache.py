"""Prompt caching: a request that starts like a recent prompt (or a prompt and its reply) copies those
keys and values instead of prefilling them, and decodes what it would have decoded without the
cache: the same tokens, the same log-probabilities (to float rounding)."""

from __future__ import annotations

import httpx
import pytest
import torch

from minigpt.batching import Batcher
from minigpt.config import ModelConfig
from minigpt.engine import Engine
from minigpt.model import GPT
from minigpt.prompt_cache import MIN_REUSE
from minigpt.serve.app import create_app
from minigpt.tokenization import CharTokenizer
from test_server import serving

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n"


@pytest.fixture(scope="module")
def engine():
    tok = CharTokenizer.train([TEXT])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2,
                            n_embd=32))
    return Engine(model, tok)


def run(batcher: Batcher, prompt: list[int], **settings):
    """Submit, step until done -> (tokens, logprobs) of the one sample."""
    req = batcher.submit(prompt, max_new_tokens=12, stop_at_eos=False, logprobs=1, **settings)
    while not req.done:
        batcher.step()
    events = [e for e in req.drain()[0] if e.token is not None]
    return [e.token for e in events], [e.logprob for e in events]


def test_a_shared_prefix_is_copied_not_prefilled_and_decodes_the_same(engine):
    ids = engine.tokenizer.encode(TEXT)  # 86 tokens
    first, second = ids[:80], ids[:70] + ids[::-1][:10]
    cached = Batcher(engine, max_rows=4, start=False, prompt_cache=4)
    plain = Batcher(engine, max_rows=4, start=False)
    run(cached, first, temperature=0)
    before = cached.prompt_tokens_prefilled
    got = run(cached, second, temperature=0.9, seed=3)
    assert cached.stats()["prompt_cache_hits"] == 1
    assert cached.stats()["prompt_tokens_reused"] == 70
    assert cached.prompt_tokens_prefilled - before == 10  # only what differs
    want = run(plain, second, temperature=0.9, seed=3)
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=1e-5)
    assert plain.stats()["prompt_cache_hits"] == 0


def test_a_chat_continuation_reuses_the_prompt_and_the_reply(engine):
    ids = engine.tokenizer.encode(TEXT)
    cached = Batcher(engine, max_rows=4, start=False, prompt_cache=4)
    prompt = ids[:40]
    reply, _ = run(cached, prompt, temperature=0)
    follow = prompt + reply + ids[40:60]  # the history, the model's reply, a new turn
    before = cached.prompt_tokens_prefilled
    got = run(cached, follow, temperature=0)
    # the reply's last token was never fed to the model: it and the new turn are computed
    assert cached.prompt_tokens_prefilled - before == 1 + 20
    assert cached.stats()["prompt_tokens_reused"] == len(prompt) + len(reply) - 1
    assert got[0] == run(Batcher(engine, max_rows=4, start=False), follow, temperature=0)[0]


def test_the_cache_holds_at_most_its_capacity_least_recently_used_out(engine):
    ids = engine.tokenizer.encode(TEXT)
    cached = Batcher(engine, max_rows=2, start=False, prompt_cache=2)
    a, b, c = ids[:30], ids[30:60], ids[56:86]
    for p in (a, b, c):  # a is dropped (each prompt's reply extends its entry)
        run(cached, p, temperature=0)
    assert len([held for held in cached.prompt_cache.ids if held is not None]) == 2
    run(cached, b + [ids[0]] * 5, temperature=0)
    run(cached, a + [ids[0]] * 5, temperature=0)
    assert cached.stats()["prompt_cache_hits"] == 1  # b was kept, a was not
    assert cached.stats()["prompt_tokens_reused"] >= len(b)  # b, and any reply it shares


def test_short_shared_prefixes_are_recomputed(engine):
    ids = engine.tokenizer.encode(TEXT)
    cached = Batcher(engine, max_rows=2, start=False, prompt_cache=2)
    run(cached, ids[:40], temperature=0)
    run(cached, ids[: MIN_REUSE - 1] + ids[::-1][:25], temperature=0)
    assert cached.stats()["prompt_cache_hits"] == 0


def test_the_server_reuses_and_counts_it_in_metrics(engine):
    ids = engine.tokenizer.encode(TEXT)
    with serving(create_app(engine, model_id="tiny")) as url:
        body = {"max_tokens": 4, "temperature": 0}
        a = httpx.post(f"{url}/v1/completions", json={**body, "prompt": ids[:80]}).json()
        b = httpx.post(f"{url}/v1/completions", json={**body, "prompt": ids[:80]}).json()
        metrics = httpx.get(f"{url}/metrics").text
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert "minigpt_prompt_cache_hits_total 1.0" in metrics
    assert "minigpt_prompt_tokens_reused_total 79.0" in metrics
