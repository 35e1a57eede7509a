"""Choosing the next token: the sampling settings (`SamplingParams`) and the pure functions that
apply them to logits (temperature, top-k, top-p) with an explicit RNG.

`SamplingParams` is the one place sampling defaults live: `minigpt sample`, `Engine.generate/stream`,
the sample printed during training, `minigpt bench generate` and the server all build one, so they
sample alike out of the box. The default temperature is 0.8 everywhere (the server included, where
OpenAI's API says 1.0): small char-level models ramble at 1.0, and 0.8 is what nanoGPT samples at.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a completion. Built once per request; `validate()` is the only check."""

    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate per sample"})
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy (argmax)"})
    top_k: int | None = field(default=None, metadata={"help": "keep the k most likely tokens (0 = off)"})
    top_p: float | None = field(default=None, metadata={
        "help": "nucleus sampling: keep the most likely tokens up to this probability mass"})
    seed: int | None = field(default=None, metadata={"help": "the same seed gives the same text"})
    num_samples: int = field(default=1, metadata={"help": "independent samples, decoded in one batch"})
    stop_at_eos: bool = field(default=True, metadata={"help": "end a sample at the end-of-text token"})

    def validate(self) -> SamplingParams:
        if self.max_new_tokens is None or self.max_new_tokens < 1:
            raise ConfigError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples is None or self.num_samples < 1:
            raise ConfigError(f"num-samples must be >= 1, got {self.num_samples}")
        if self.temperature is None or self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top-p must be in (0, 1], got {self.top_p}")
        return self

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes` (None values mean "keep"), validated."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown sampling setting(s): {', '.join(unknown)}")
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **given).validate()


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
