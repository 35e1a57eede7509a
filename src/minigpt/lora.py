"""LoRA (Hu et al., 2021): the adapters' tensors, their names, and folding them into the weights.

A model whose config has `lora_rank` r > 0 is a frozen base plus, on each projection named in
`lora_targets` (block-relative GPT-2 names, config.LORA_TARGETS), two trainable matrices registered
on that nn.Linear beside its weight: `lora_A` (r, in) and `lora_B` (out, r). The projection computes
W x + b + (alpha / r) B A x; GPT._layer does so through `project`, the one place it is written.
B starts at zero, so a fresh adapter computes exactly what its base does; A starts as PEFT's and
torch's Linear default (Kaiming-uniform, bound 1 / sqrt(in)).

Folding W + (alpha / r) B A (`fold`) is exact up to float rounding: an evaluating model gathers
folded weights once (no extra cost per token), and `merged` turns a LoRA model into a plain one (the
exports). A checkpoint of a LoRA run stores the adapters only (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

ADAPTER_NAMES = ("lora_A", "lora_B")
Adapter = tuple[torch.Tensor, torch.Tensor, float]  # (A, B, scale)


def scale(cfg: ModelConfig) -> float:
    return cfg.lora_alpha / cfg.lora_rank


def is_adapter(name: str) -> bool:
    """Whether a state_dict key is a LoRA adapter's tensor (h.0.attn.c_attn.lora_A, ...)."""
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


def targets(block: nn.Module, cfg: ModelConfig) -> list[nn.Linear]:
    """The block's projections that carry an adapter, in LORA_TARGETS' order."""
    return [block.get_submodule(name) for name in cfg.lora_targets]


def attach(model: nn.Module, cfg: ModelConfig) -> None:
    """Freeze every parameter of `model` and register a fresh adapter on each target projection."""
    for p in model.parameters():
        p.requires_grad_(False)
    r = cfg.lora_rank
    for block in model.h:
        for linear in targets(block, cfg):
            a = nn.Parameter(torch.empty(r, linear.in_features))
            nn.init.uniform_(a, -1 / math.sqrt(linear.in_features), 1 / math.sqrt(linear.in_features))
            linear.register_parameter("lora_A", a)
            linear.register_parameter("lora_B", nn.Parameter(torch.zeros(linear.out_features, r)))


def adapter_of(linear: nn.Linear, cfg: ModelConfig) -> Adapter | None:
    a = getattr(linear, "lora_A", None)
    return None if a is None else (a, linear.lora_B, scale(cfg))


def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
            adapter: Adapter | None) -> torch.Tensor:
    """x W^T + b, plus the adapter's scale * (x A^T) B^T: the low-rank path never forms B A.
    Added in place: x W^T's backward does not need it, and a fresh (tokens, out) sum per
    projection fragmented the CPU heap (peak RSS +30% on the large preset, docs/finetune.md)."""
    y = F.linear(x, w, b)
    if adapter is None:
        return y
    a, bm, s = adapter
    return y.add_(F.linear(F.linear(x, a) * s, bm))


@torch.no_grad()
def fold(w: torch.Tensor, adapter: Adapter | None) -> torch.Tensor:
    """W + scale * B A, summed in float32 and returned in W's dtype (W itself without an adapter)."""
    if adapter is None:
        return w
    a, bm, s = adapter
    with torch.inference_mode(False):  # a plain tensor, even when first gathered in inference mode
        return (w.float() + s * (bm.float() @ a.float())).to(w.dtype)


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The config of the model with the adapters folded in: the same layout, no LoRA."""
    return dataclasses.replace(cfg, lora_rank=0, lora_alpha=ModelConfig.lora_alpha,
                               lora_targets=ModelConfig.lora_targets)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under their state_dict names, on the CPU (what a checkpoint stores)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
            if is_adapter(k)}


def merged(model: nn.Module) -> nn.Module:
    """A plain model (no LoRA) computing what `model` computes, adapters folded into the weights;
    `model` itself when it has none."""
    cfg = model.config
    if not cfg.lora_rank:
        return model
    out = type(model)(base_config(cfg))
    state = {k: v for k, v in model.state_dict().items() if not is_adapter(k)}
    for i, block in enumerate(model.h):
        for name, linear in zip(cfg.lora_targets, targets(block, cfg)):
            state[f"h.{i}.{name}.weight"] = fold(linear.weight, adapter_of(linear, cfg))
    out.load_state_dict(state)
    first = next(model.parameters())
    return out.to(device=first.device, dtype=first.dtype).eval()
