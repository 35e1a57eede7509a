"""Log-probabilities from the engine: each sampled token's logprob and its top alternatives equal a
log-softmax computed here, independently, from the model's own logits (a full forward of the text
so far, no KV cache) with the request's temperature and filters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minigpt.config import ModelConfig
from minigpt.engine import Engine
from minigpt.model import GPT
from minigpt.tokenization import CharTokenizer
from minigpt.tools.evaluate import score_tokens


@pytest.fixture(scope="module")
def engine():
    tok = CharTokenizer.train(["abcdefgh ij\n"])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2,
                            n_embd=16))
    return Engine(model, tok)


def reference_logprobs(engine, ids: list[int], temperature: float) -> torch.Tensor:
    """log p(next | ids) at `temperature` (1 for greedy), by a plain forward over the whole text."""
    with torch.no_grad():
        logits, _ = engine.model(torch.tensor([ids]))
    return torch.log_softmax(logits[0, -1].double() / (temperature or 1.0), dim=-1)


def check_events(engine, prompt: str, k: int, temperature: float, **settings):
    ids = engine.encode_prompt(prompt)
    events = list(engine.stream(prompt, max_new_tokens=20, temperature=temperature, logprobs=k,
                                stop_at_eos=False, **settings))
    for ev in events:
        ref = reference_logprobs(engine, ids, temperature)
        assert ev.logprob == pytest.approx(float(ref[ev.token]), abs=1e-4)
        values = [v for _, v in ev.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert len(ev.top_logprobs) == k
        assert [t for t, _ in ev.top_logprobs] == torch.topk(ref, k).indices.tolist()
        for t, v in ev.top_logprobs:
            assert v == pytest.approx(float(ref[t]), abs=1e-4)
        if ev.logprob >= values[-1] - 1e-6:  # the sampled token is in the top k: it is listed
            assert ev.token in [t for t, _ in ev.top_logprobs]
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        ids.append(ev.token)
    return events


def test_sampled_logprobs_are_the_temperature_softmax_of_the_models_logits(engine):
    events = check_events(engine, "abc", k=4, temperature=0.7, seed=3)
    assert len({ev.token for ev in events}) > 1  # really sampled, not one repeated token


def test_greedy_reports_the_models_own_softmax_and_its_argmax(engine):
    events = check_events(engine, "ab", k=3, temperature=0.0)
    assert all(ev.token == ev.top_logprobs[0][0] for ev in events)


def test_top_k_filtered_tokens_have_probability_zero_and_are_not_listed(engine):
    events = list(engine.stream("abc", max_new_tokens=10, temperature=1.0, top_k=3, logprobs=6,
                                seed=1, stop_at_eos=False))
    for ev in events:
        assert len(ev.top_logprobs) == 3  # the three survivors, however many were asked for
        assert sum(math.exp(v) for _, v in ev.top_logprobs) == pytest.approx(1.0, abs=1e-5)
        assert ev.token in [t for t, _ in ev.top_logprobs]


def test_logprobs_do_not_change_what_is_sampled(engine):
    plain = [e.token for e in engine.stream("abc", max_new_tokens=25, seed=9)]
    scored = [e.token for e in engine.stream("abc", max_new_tokens=25, seed=9, logprobs=2)]
    assert plain == scored
    assert all(e.logprob is None for e in engine.stream("abc", max_new_tokens=3))


def test_score_gives_each_prompt_token_its_logprob_given_the_tokens_before(engine):
    ids = engine.encode_prompt("abcabd")
    scores = engine.score(ids, 2)
    assert scores[0] == (None, [])
    for i in range(1, len(ids)):
        ref = reference_logprobs(engine, ids[:i], 1.0)
        lp, top = scores[i]
        assert lp == pytest.approx(float(ref[ids[i]]), abs=1e-4)
        assert [t for t, _ in top] == torch.topk(ref, 2).indices.tolist()


def test_score_of_a_prompt_longer_than_the_context_gives_every_token_a_full_window(engine):
    """Every token after the first is scored with the up to block_size tokens before it, as
    `minigpt eval --stride 1` scores a text; 200 tokens cross several forwards of windows."""
    text = ("abc defg hij\n" * 16)[:200]
    ids = engine.encode_prompt(text)
    scores = engine.score(ids, 1)
    assert len(scores) == len(ids) and scores[0] == (None, [])
    block = engine.model.config.block_size
    for i in (1, block - 1, block, block + 1, 150, len(ids) - 1):
        ref = reference_logprobs(engine, ids[max(0, i - block):i], 1.0)
        assert scores[i][0] == pytest.approx(float(ref[ids[i]]), abs=1e-4)
    loss, _ = score_tokens(engine.model, np.array(ids), stride=1)  # `minigpt eval --stride 1`
    assert -sum(lp for lp, _ in scores[1:]) / (len(ids) - 1) == pytest.approx(loss, abs=1e-5)
