"""Choosing the next token of every row of a batch at once: temperature, top-k, top-p and min-p applied to
the whole (rows, vocab) logits with each row's own settings as tensors (`RowSettings`), an explicit
uniform per row, and the log-probabilities of the distribution each token was drawn from. The
settings themselves are `config.SamplingParams` (re-exported here), the one place sampling defaults
live.

Each row's result depends only on its own logits, settings and uniform, so rows of different
requests (each with its own generator) are chosen in one call and a request's tokens never depend
on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import SamplingParams

__all__ = ["RowSettings", "SamplingParams", "TokenLogprobs", "choose_tokens", "distribution",
           "sample_next_token", "token_logprobs", "uniforms"]


@dataclass
class RowSettings:
    """The sampling settings of B rows as tensors. A greedy row (temperature 0) is computed at
    temperature 1 with no filter: its argmax is the greedy token and its log-probabilities are the
    model's own, which is what greedy decoding reports."""

    temperature: torch.Tensor  # (B, 1) float32; 1 for greedy rows
    greedy: torch.Tensor | None  # (B,) bool; None when no row is greedy
    all_greedy: bool
    top_k: torch.Tensor | None  # (B, 1) keep the k largest (vocab: keep all); None: no row filters
    top_p: torch.Tensor | None  # (B, 1) nucleus mass (inf: keep all); None: no row filters
    min_p: torch.Tensor | None = None  # (B, 1) fraction of the top probability (0: keep all)

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab: int,
           device: torch.device | str = "cpu") -> RowSettings:
        greedy = [p.temperature == 0 for p in params]
        top_k = [p.top_k if p.top_k and p.top_k < vocab and not g else vocab
                 for p, g in zip(params, greedy)]
        top_p = [p.top_p if p.top_p is not None and p.top_p < 1.0 and not g else float("inf")
                 for p, g in zip(params, greedy)]
        min_p = [p.min_p if p.min_p and not g else 0.0 for p, g in zip(params, greedy)]
        column = dict(device=device, dtype=torch.float32)
        return cls(
            temperature=torch.tensor([[1.0 if g else p.temperature]
                                      for p, g in zip(params, greedy)], **column),
            greedy=torch.tensor(greedy, device=device) if any(greedy) else None,
            all_greedy=all(greedy),
            top_k=torch.tensor(top_k, device=device).view(-1, 1) if min(top_k) < vocab else None,
            top_p=torch.tensor(top_p, **column).view(-1, 1) if min(top_p) < 1.0 else None,
            min_p=torch.tensor(min_p, **column).view(-1, 1) if max(min_p) > 0.0 else None,
        )


def distribution(logits: torch.Tensor, s: RowSettings) -> torch.Tensor:
    """logits (B, V) -> the logits each row samples from, float32: divided by the row's
    temperature, tokens outside its top-k / nucleus (top-p) at -inf, and those less likely than
    min-p times the most likely token (at that temperature; vLLM's and llama.cpp's min-p)."""
    x = logits.float() / s.temperature
    if s.min_p is not None:  # p < min_p * p_max  <=>  x < x_max + log(min_p); log(0) keeps all
        x = x.masked_fill(x < x.amax(dim=-1, keepdim=True) + s.min_p.log(), float("-inf"))
    if s.top_k is None and s.top_p is None:
        return x
    ranked = torch.sort(x, dim=-1, descending=True)
    drop = torch.zeros_like(x, dtype=torch.bool)
    values = ranked.values
    if s.top_k is not None:  # ties with the k-th value stay
        kth = values.gather(-1, s.top_k - 1)
        drop |= x < kth
        if s.top_p is not None:  # top-p ranks what top-k kept
            values = values.masked_fill(values < kth, float("-inf"))
    if s.top_p is not None:
        probs = values.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_ranked = (probs.cumsum(dim=-1) - probs) >= s.top_p
        drop |= drop_ranked.scatter(-1, ranked.indices, drop_ranked)
    return x.masked_fill(drop, float("-inf"))


def uniforms(generator: torch.Generator | None, rows: int, device: torch.device | str = "cpu"
             ) -> torch.Tensor:
    """The random draws of one sampling step: one uniform per row, (rows, 1), float32."""
    return torch.rand(rows, 1, generator=generator, device=device, dtype=torch.float32)


def choose_tokens(x: torch.Tensor, s: RowSettings, u: torch.Tensor | None) -> torch.Tensor:
    """The one place a next token is chosen: `distribution` logits x (B, V) and the rows'
    uniforms u (B, 1) (None when every row is greedy) -> token ids (B,)."""
    if s.all_greedy:
        return x.argmax(dim=-1)
    # inverse-CDF sampling: one uniform per row, the token whose cumulative-probability interval
    # holds it. Same distribution as torch.multinomial at half its cost per decoded token on CPU.
    cdf = x.softmax(dim=-1).cumsum_(dim=-1)
    tokens = (cdf < u.to(cdf.device) * cdf[:, -1:]).sum(dim=-1)
    return tokens if s.greedy is None else torch.where(s.greedy, x.argmax(dim=-1), tokens)


def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None,
                      temperature: float = SamplingParams.temperature, top_k: int | None = None,
                      top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,), every row with the same settings."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p).validate()
    s = RowSettings.of([params] * logits.size(0), logits.size(-1), logits.device)
    u = None if s.all_greedy else uniforms(generator, logits.size(0), logits.device)
    return choose_tokens(distribution(logits, s), s, u)


@dataclass
class TokenLogprobs:
    """What `token_logprobs` returns for one step of B rows."""

    logprob: torch.Tensor  # (B,) log-probability of the token each row sampled
    top_logprobs: torch.Tensor  # (B, k) the k largest log-probabilities, descending
    top_ids: torch.Tensor  # (B, k) their token ids


def token_logprobs(x: torch.Tensor, tokens: torch.Tensor, k: int) -> TokenLogprobs:
    """The `tokens` (B,)' log-probabilities and the top `k` of each row under the logits x (B, V)
    they were drawn from (`distribution`'s; a token filtered out has -inf)."""
    logp = x.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, tokens.view(-1, 1).to(logp.device)).squeeze(-1)
    top = torch.topk(logp, min(k, logp.size(-1)), dim=-1)
    return TokenLogprobs(chosen, top.values, top.indices)
