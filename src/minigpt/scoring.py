"""Scoring a text under the model, every token once, however long the text: the sliding windows
`minigpt eval` moves over a text, and each token's log-probability with the longest context the
model allows (what `echo` + `logprobs` report for a prompt).

A window of the model's context T feeds tokens[start : start + L] (L = min(T, n - 1)) and predicts
tokens[start + 1 : start + L + 1]. With stride 1 the first window scores its L predictions and each
later window only its last, so every token after the first has min(its position, T) tokens of
context, as `minigpt eval --stride 1` scores it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .model import GPT
from .sampling import token_logprobs

WINDOWS_PER_FORWARD = 64  # stride-1 windows scored in one forward (each gives one position)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) of each window over `n_tokens` tokens; together they score
    each of the n_tokens - 1 predictions exactly once, and the last window ends at the text's end."""
    targets = n_tokens - 1
    length = min(context, targets)
    out = [(0, 0)]
    done = length  # predictions scored so far
    while done < targets:
        end = min(done + stride, targets)
        out.append((end - length, done - (end - length)))
        done = end
    return out


@torch.inference_mode()
def token_scores(model: GPT, ids: Sequence[int], k: int) -> list[tuple[float | None, list]]:
    """(logprob, top k [(id, logprob)]) of each token under the model's own distribution
    (temperature 1, unfiltered) given every token before it up to the model's context; the first
    token has no context: (None, [])."""
    out: list[tuple[float | None, list]] = [(None, [])]
    if len(ids) < 2:
        return out[: len(ids)]
    device = next(model.parameters()).device
    x = torch.tensor(list(ids), dtype=torch.long, device=device)
    plan = windows(len(ids), model.config.block_size, 1)
    length = min(model.config.block_size, len(ids) - 1)
    logits, _ = model(x[None, :length])  # the first window: each of its predictions
    parts = [(logits[0], x[1 : length + 1])]
    span = torch.arange(length, device=device)
    for i in range(1, len(plan), WINDOWS_PER_FORWARD):  # later windows: their last prediction
        starts = torch.tensor([s for s, _ in plan[i : i + WINDOWS_PER_FORWARD]], device=device)
        last, _ = model(x[starts[:, None] + span], last_only=True)
        parts.append((last[:, -1], x[starts + length]))
    s = token_logprobs(torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts]), k)
    for lp, vals, top in zip(s.logprob.tolist(), s.top_logprobs.tolist(), s.top_ids.tolist()):
        out.append((lp, list(zip(top, vals))))
    return out
