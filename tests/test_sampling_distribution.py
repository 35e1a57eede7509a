"""The sampler draws tokens with exactly the model's probabilities (after temperature, top-k, top-p)."""

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
