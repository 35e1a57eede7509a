"""Optimizers and the learning-rate schedule (a pure function of the step).

`adamw`: AdamW on everything (decay on matrices only). `muon`: Muon on the hidden matrices of the
transformer blocks (attention and MLP weights), AdamW on embeddings, LM head, norm gains and biases.
Muon (Jordan et al., 2024) replaces each matrix update by the nearest semi-orthogonal matrix of its
momentum, so every direction of the matrix learns at the same rate; on this project's recipe it
reaches a given loss in fewer steps (docs/speed.md).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from .. import lora
from ..config import TrainConfig


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
    if cfg.optimizer == "muon":
        return MuonAdamW(model, cfg)
    return _adamw(param_groups(model, cfg.weight_decay), cfg, next(model.parameters()).device.type)


def _adamw(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    # the fused kernel is fastest where it exists; foreach is the portable fast path
    fused = device_type in ("cuda", "mps", "cpu") and _fused_supported(device_type)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             **({"fused": True} if fused else {}))


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


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Apply the schedule to every group (each keeps its own peak as `base_lr`); return AdamW's lr."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("base_lr", cfg.lr) / cfg.lr
    return lr


# --- Muon ----------------------------------------------------------------------------------------

# Quintic Newton-Schulz coefficients from Keller Jordan's Muon: they push every singular value of
# the update towards ~1 in five steps (not exactly 1, which does not hurt training).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """(m, n) or (batch, m, n) with m <= n -> approximately the nearest semi-orthogonal U V^T."""
    a, b, c = NS_COEFFS
    # bfloat16 is Muon's usual precision on GPUs; CPUs without bf16 matmul units run fp32 faster
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x.unsqueeze(0) if g.dim() == 2 else x
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.mT  # (batch, m, m): the small side, hence m <= n
        x = torch.baddbmm(x, torch.baddbmm(s, s, s, beta=b, alpha=c), x, beta=a)
    return (x[0] if g.dim() == 2 else x).to(g.dtype)


def is_muon_param(name: str, p: torch.nn.Parameter) -> bool:
    """Hidden matrices only: embeddings and the LM head keep AdamW, as Muon's authors advise. LoRA
    factors keep it too: orthogonalising a rank-r factor's update gives each of its r directions
    a unit step, far from a small change of the product B A."""
    return p.dim() == 2 and name.startswith("h.") and not lora.is_adapter(name)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two rules: groups with `muon=True` take Muon steps, the others AdamW steps.

    Muon: Nesterov momentum, then the update is orthogonalised (same-shaped matrices together, as
    one batched matmul) and scaled by sqrt(max(1, fan_out / fan_in)).
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, momentum: float = 0.95,
                 ns_steps: int = 5):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        muon = [p for n, p in named if is_muon_param(n, p)]
        adam = [(n, p) for n, p in named if not is_muon_param(n, p)]
        groups = [
            {"params": muon, "muon": True, "lr": cfg.muon_lr, "base_lr": cfg.muon_lr,
             "weight_decay": 0.0},
            {"params": [p for _, p in adam if p.dim() >= 2], "muon": False, "lr": cfg.lr,
             "base_lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in adam if p.dim() < 2], "muon": False, "lr": cfg.lr,
             "base_lr": cfg.lr, "weight_decay": 0.0},
        ]
        defaults = dict(momentum=momentum, ns_steps=ns_steps, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
        super().__init__([g for g in groups if g["params"]], defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        mom, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        grads = [p.grad for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - mom)
        updates = torch._foreach_lerp(grads, bufs, mom)  # Nesterov: look one momentum step ahead
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        # tall matrices are transposed so that a (512, 128) and a (128, 512) share one batch
        batches: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            batches[(min(p.shape), max(p.shape))].append(i)
        for idx in batches.values():
            stacked = torch.stack([updates[i].mT if params[i].size(0) > params[i].size(1)
                                   else updates[i] for i in idx])
            ortho = orthogonalize(stacked, group["ns_steps"])
            for j, i in enumerate(idx):
                p = params[i]
                tall = p.size(0) > p.size(1)
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(ortho[j].mT if tall else ortho[j], alpha=-lr * scale)

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        (beta1, beta2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for s, p in zip(states, params):
            if not s:
                s["step"] = torch.zeros((), dtype=torch.float32)
                s["exp_avg"] = torch.zeros_like(p)
                s["exp_avg_sq"] = torch.zeros_like(p)
        step = float(states[0]["step"]) + 1
        for s in states:
            s["step"].fill_(step)
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** step))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - beta1 ** step))
