"""Optimizer construction and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights of Linear/Embedding); never decay biases and norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields tied tensors once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    device_type = next(model.parameters()).device.type
    # the fused kernel is fastest where it exists; foreach is the portable fast path
    fused = device_type in ("cuda", "mps", "cpu") and _fused_supported(device_type)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        eps=1e-8, **({"fused": True} if fused else {}),
    )


def _fused_supported(device_type: str) -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(1, device=device_type))
        torch.optim.AdamW([p], fused=True)
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at lr_decay_iters (default max_iters)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
