"""The sampler draws tokens with exactly the model's probabilities (after temperature, top-k, top-p, min-p)."""

from __future__ import annotations

import torch

from minigpt.sampling import sample_next_token


def frequencies(logits: torch.Tensor, n: int = 40_000, **options) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits.expand(n, -1), gen, **options)
    return torch.bincount(tokens, minlength=logits.size(-1)).float() / n


def test_frequencies_match_the_softmax_at_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    for temperature in (1.0, 0.5):
        want = (logits[0] / temperature).softmax(-1)
        got = frequencies(logits, temperature=temperature)
        assert (got - want).abs().max() < 0.01, (temperature, got, want)


def test_filtered_tokens_are_never_drawn():
    logits = torch.tensor([[3.0, 2.9, 0.0, -5.0, 2.8, 1.0]])
    got = frequencies(logits, top_k=3)
    assert got[[2, 3, 5]].sum() == 0
    want = logits[0, [0, 1, 4]].softmax(-1)
    assert (got[[0, 1, 4]] - want).abs().max() < 0.01


def test_same_seed_same_tokens_and_greedy_is_argmax():
    logits = torch.randn(8, 50)
    a = sample_next_token(logits, torch.Generator().manual_seed(3), temperature=0.9)
    b = sample_next_token(logits, torch.Generator().manual_seed(3), temperature=0.9)
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (8,)
    assert torch.equal(sample_next_token(logits, None, temperature=0), logits.argmax(-1))


def test_min_p_keeps_the_tokens_at_least_that_fraction_as_likely_as_the_top_one():
    # probabilities at temperature 1: e^0 : e^-1 : e^-2 : e^-3 of the top one = 1, .37, .14, .05
    logits = torch.tensor([[0.0, -1.0, -2.0, -3.0]])
    got = frequencies(logits, temperature=1.0, min_p=0.1)
    assert got[3] == 0 and got[2] > 0
    want = logits[0, :3].softmax(-1)
    assert (got[:3] - want).abs().max() < 0.01
    # at temperature 0.5 the ratios square: .14 and .02 of the top fall under 0.1 -> two remain
    assert frequencies(logits, temperature=0.5, min_p=0.1)[2:].sum() == 0
