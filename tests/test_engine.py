import pytest
import torch

from minigpt.config import ModelConfig
from minigpt.engine import Engine
from minigpt.errors import ConfigError, TokenizerError
from minigpt.model import GPT
from minigpt.sampling import SamplingParams
from minigpt.tokenization import CharTokenizer


@pytest.fixture(scope="module")
def engine():
    tok = CharTokenizer.train(["abcdefgh é\n"])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=2, n_head=2, n_embd=16))
    return Engine(model, tok)


def test_same_seed_same_text_and_streaming_matches_generate(engine):
    a = engine.generate("abc", max_new_tokens=30, seed=3)
    b = engine.generate("abc", max_new_tokens=30, seed=3)
    streamed = "".join(e.text for e in engine.stream("abc", max_new_tokens=30, seed=3))
    assert a == b == streamed
    assert engine.generate("abc", max_new_tokens=30, seed=4) != a


def test_greedy_decoding_with_cache_matches_recomputing_the_window(engine):
    """Past the context the engine rebuilds its cache from the last 3/4 of the window; greedy
    output must equal a naive loop that recomputes that same window from scratch every token."""
    T = engine.block_size
    keep = T - T // 4
    prompt = engine.encode_prompt("abcabc")
    ids, start = list(prompt), 0
    with torch.no_grad():
        for _ in range(30):
            if len(ids) - start > T:
                start = len(ids) - keep
            logits, _ = engine.model(torch.tensor([ids[start:]]))
            ids.append(int(logits[0, -1].argmax()))
    got = engine.token_ids(prompt, SamplingParams(max_new_tokens=30, temperature=0,
                                                  stop_at_eos=False))[0]
    assert got == ids[len(prompt) :]


def test_prompt_longer_than_context_and_generation_past_it_work(engine):
    events = list(engine.stream("abcdefgh" * 5, max_new_tokens=50, seed=1, stop_at_eos=False))
    assert len(events) == 50 and events[-1].finish_reason == "length"


def test_num_samples_are_independent_streams(engine):
    samples = engine.generate_many("a", num_samples=4, max_new_tokens=20, seed=2)
    assert len(samples) == 4 and len(set(samples)) > 1


def test_empty_prompt_starts_from_bos(engine):
    assert engine.encode_prompt("") == [engine.tokenizer.bos_id]


def test_unknown_prompt_characters_and_bad_settings(engine):
    with pytest.raises(TokenizerError, match="'z'"):
        engine.generate("xyz")
    with pytest.raises(ConfigError):
        engine.generate("a", max_new_tokens=0)
