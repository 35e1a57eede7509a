"""lm-evaluation-harness's `local-completions` with its default settings against `minigpt serve`:
it finds /tokenizer_info and /tokenize, tokenizes remotely, sends token-id prompts with echo and
logprobs, and the log-likelihoods it reads back equal a forward pass computed here. An optional
extra: `make test-lmeval` installs it and runs this file."""

from __future__ import annotations

import pytest
import torch

from minigpt.config import ModelConfig
from minigpt.engine import Engine
from minigpt.model import GPT
from minigpt.serve.app import create_app
from minigpt.tokenization import CharTokenizer
from test_server import serving

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: make test-lmeval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

TEXT = "the cat sat on the mat. the dog ran to the log.\n"
PAIRS = [("the cat", " sat on"), ("the dog ran to", " the log."), ("a", " cat")]


@pytest.fixture(scope="module")
def engine():
    tok = CharTokenizer.train([TEXT])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2,
                            n_embd=32))
    return Engine(model, tok)


def reference(engine: Engine, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation | context) by one forward per token over the window before it."""
    ctx, cont = engine.tokenizer.encode(context), engine.tokenizer.encode(continuation)
    ids, total, greedy = ctx + cont, 0.0, True
    block = engine.model.config.block_size
    with torch.no_grad():
        for i in range(len(ctx), len(ids)):
            logits, _ = engine.model(torch.tensor([ids[max(0, i - block):i]]))
            logp = logits[0, -1].double().log_softmax(-1)
            total += float(logp[ids[i]])
            greedy &= int(logp.argmax()) == ids[i]
    return total, greedy


def test_local_completions_loglikelihoods_equal_a_forward_pass(engine):
    with serving(create_app(engine, model_id="tiny")) as url:
        lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="tiny")
        assert lm.tokenizer_backend == "remote"  # found /tokenizer_info and /tokenize
        requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
        got = lm.loglikelihood(requests)
        long = ("the cat sat on the mat. the dog ran", " to the log.")  # past the 16-token context
        [(long_lp, _)] = lm.loglikelihood([Instance("loglikelihood", {}, long, 0)])
        [text] = lm.generate_until([Instance("generate_until", {}, (
            "the cat", {"until": ["\n"], "max_gen_toks": 8}), 0)])
    for (lp, greedy), pair in zip(got, PAIRS):
        want_lp, want_greedy = reference(engine, *pair)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    assert long_lp == pytest.approx(reference(engine, *long)[0], abs=1e-4)
    assert text == "".join(e.text for e in engine.stream("the cat", max_new_tokens=8,
                                                         temperature=0, stop=["\n"]))
