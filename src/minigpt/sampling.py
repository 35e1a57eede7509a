"""Choosing the next token: pure functions that apply the sampling settings to logits
(temperature, top-k, top-p) with an explicit RNG, and the log-probabilities of the distribution a
token was drawn from. The settings themselves are `config.SamplingParams` (re-exported here), the
one place sampling defaults live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SamplingParams

__all__ = ["SamplingParams", "TokenLogprobs", "choose_tokens", "filter_logits", "sample_next_token",
           "sampling_logprobs", "token_logprobs", "uniforms"]


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
        return choose_tokens(logits, 0, None, None, None)
    return choose_tokens(logits, temperature, top_k, top_p, uniforms(generator, logits.size(0),
                                                                     logits.device))


def uniforms(generator: torch.Generator | None, rows: int, device: torch.device | str = "cpu"
             ) -> torch.Tensor:
    """The random draws of one sampling step: one uniform per row, (rows, 1), float32."""
    return torch.rand(rows, 1, generator=generator, device=device, dtype=torch.float32)


def choose_tokens(logits: torch.Tensor, temperature: float, top_k: int | None,
                  top_p: float | None, u: torch.Tensor | None) -> torch.Tensor:
    """The one place a next token is chosen, for a single stream and for a batch alike: logits
    (B, V) and the rows' uniforms u (B, 1) (from `uniforms`, None when greedy) -> token ids (B,).

    Each row's result depends only on its own logits and its own uniform, so rows of different
    requests (each with its own generator) can be chosen in one call."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    # inverse-CDF sampling: one uniform per row, the token whose cumulative-probability interval
    # holds it. Same distribution as torch.multinomial at half its cost per decoded token on CPU.
    cdf = logits.softmax(dim=-1).cumsum_(dim=-1)
    return (cdf < u.to(cdf.device) * cdf[:, -1:]).sum(dim=-1)


@dataclass
class TokenLogprobs:
    """What `token_logprobs` returns for one step of B streams."""

    logprob: torch.Tensor  # (B,) log-probability of the token each stream sampled
    top_logprobs: torch.Tensor  # (B, k) the k largest log-probabilities, descending
    top_ids: torch.Tensor  # (B, k) their token ids


def sampling_logprobs(logits: torch.Tensor, temperature: float = SamplingParams.temperature,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> log-probabilities (B, V) of the distribution `sample_next_token` draws from:
    log_softmax(filter(logits / temperature)), -inf for filtered tokens. Greedy (temperature 0)
    draws from no distribution; it reports the model's own, log_softmax(logits) at temperature 1
    with no top-k/top-p filter (its argmax is the greedy token)."""
    logits = logits.float()
    if temperature == 0:
        return logits.log_softmax(dim=-1)
    return filter_logits(logits / temperature, top_k, top_p).log_softmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int,
                   temperature: float = SamplingParams.temperature, top_k: int | None = None,
                   top_p: float | None = None) -> TokenLogprobs:
    """The sampled `tokens` (B,)' log-probabilities and the top `k` of each row, from the same
    logits (B, V) and settings the tokens were sampled with. The engine calls this, and so must any
    other decoding loop, so that every path reports the same numbers."""
    logp = sampling_logprobs(logits, temperature, top_k, top_p)
    chosen = logp.gather(-1, tokens.view(-1, 1).to(logp.device)).squeeze(-1)
    top = torch.topk(logp, min(k, logp.size(-1)), dim=-1)
    return TokenLogprobs(chosen, top.values, top.indices)
