"""Choosing the next token: pure functions that apply the sampling settings to logits
(temperature, top-k, top-p) with an explicit RNG. The settings themselves are
`config.SamplingParams` (re-exported here), the one place sampling defaults live.
"""

from __future__ import annotations

import torch

from .config import SamplingParams

__all__ = ["SamplingParams", "filter_logits", "sample_next_token"]


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf. logits: (B, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = SamplingParams.temperature,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    # inverse-CDF sampling: one uniform per row, the token whose cumulative-probability interval
    # holds it. Same distribution as torch.multinomial at half its cost per decoded token on CPU.
    cdf = logits.softmax(dim=-1).cumsum_(dim=-1)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    return (cdf < u * cdf[:, -1:]).sum(dim=-1)
