"""What a run or a preset is: config, parameter count, training memory estimate, step, best val loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from .. import rundir
from ..config import PRESETS, ModelConfig, resolve
from ..model import GPT
from ..training.optim import is_muon_param
from .memory import format_bytes, training_memory

# Tiny Shakespeare's 65 characters + BOS + EOS: the vocabulary preset parameter counts are quoted for
SHAKESPEARE_VOCAB = 67


def preset_rows(vocab_size: int = SHAKESPEARE_VOCAB, batch_size: int | None = None,
                presets: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per preset; memory is estimated at `batch_size` per device (default: the preset's)."""
    rows = []
    for name in presets or PRESETS:
        mcfg, tcfg = resolve(name, overrides={"vocab_size": vocab_size, "batch_size": batch_size})
        params = param_count(mcfg)
        rows.append({
            "preset": name,
            "n_layer": mcfg.n_layer, "n_head": mcfg.n_head, "n_embd": mcfg.n_embd,
            "block_size": mcfg.block_size, "params": params,
            "batch_size": tcfg.batch_size, "description": PRESETS[name].description,
            "memory": memory_breakdown(mcfg, params, tcfg.batch_size, tcfg.optimizer),
        })
    return rows


def param_count(mcfg: ModelConfig) -> int:
    """Parameters of the model `mcfg` describes, counted without allocating or initialising them."""
    with torch.device("meta"):
        return GPT(mcfg).num_params()


def trainable_param_count(mcfg: ModelConfig) -> int:
    """Parameters that train: all of them, or a LoRA model's adapters."""
    with torch.device("meta"):
        return GPT(mcfg).num_params(trainable=True)


def muon_param_count(mcfg: ModelConfig) -> int:
    """Parameters that take Muon steps (the hidden matrices) when training with --optimizer muon."""
    with torch.device("meta"):
        return sum(p.numel() for n, p in GPT(mcfg).named_parameters()
                   if p.requires_grad and is_muon_param(n, p))


def memory_breakdown(mcfg: ModelConfig, params: int, batch_size: int,
                     optimizer: str) -> dict[str, dict[str, int]]:
    """Training memory per device in bytes, for float32 and for bf16/fp16 autocast."""
    muon = muon_param_count(mcfg) if optimizer == "muon" else 0
    trained = trainable_param_count(mcfg)
    return {name: training_memory(mcfg, params, batch_size, mixed, muon, trained).to_dict()
            for name, mixed in (("float32", False), ("bfloat16", True))}


def lora_info(run_dir: Path, mcfg: ModelConfig, tcfg: Any) -> dict[str, Any] | None:
    """A LoRA run's adapters and its base, which must still be there as recorded (else one line)."""
    if not mcfg.lora_rank:
        return None
    ckpt.base_state(run_dir, mcfg, tcfg)
    return {"rank": mcfg.lora_rank, "alpha": mcfg.lora_alpha, "targets": list(mcfg.lora_targets),
            "adapter_params": trainable_param_count(mcfg), "base": tcfg.init_from,
            "base_step": tcfg.init_step}


def run_info(run_dir: Path) -> dict[str, Any]:
    mcfg, tcfg = rundir.read_config(run_dir)
    adapters = lora_info(run_dir, mcfg, tcfg)
    ckpts = ckpt.list_checkpoints(run_dir)
    best = ckpt.best_step(run_dir)
    best_val = rundir.read_best(run_dir)["val_loss"] if best is not None else None
    params = param_count(mcfg)
    return {
        "run_dir": str(run_dir),
        "params": params,
        "memory": memory_breakdown(mcfg, params, tcfg.batch_size, tcfg.optimizer),
        "step": ckpts[-1][0] if ckpts else 0,
        "max_iters": tcfg.max_iters,
        "best_step": best,
        "best_val_loss": best_val,
        "best_val_bpb": _logged_val_bpb(run_dir, best),
        "checkpoints": [s for s, _ in ckpts],
        "init_from": ({"source": tcfg.init_from, "step": tcfg.init_step, "sha256": tcfg.init_sha256}
                      if tcfg.init_from else None),
        "lora": adapters,
        "model": dataclasses.asdict(mcfg),
        "train": dataclasses.asdict(tcfg),
    }


def _logged_val_bpb(run_dir: Path, step: int | None) -> float | None:
    """The validation bits per byte metrics.jsonl logged at `step` (None if it logged none)."""
    if step is None or not rundir.metrics_path(run_dir).exists():
        return None
    return next((row["val_bpb"] for row in rundir.read_metrics(run_dir)
                 if row.get("iter") == step and row.get("val_bpb") is not None), None)


def format_run_info(info: dict[str, Any]) -> str:
    m = info["model"]
    best = f"{info['best_val_loss']:.4f} at step {info['best_step']}" if info["best_val_loss"] else "none yet"
    if info["best_val_loss"] and info["best_val_bpb"] is not None:
        best += f" ({info['best_val_bpb']:.4f} bits per byte)"
    lines = [
        f"run:            {info['run_dir']}",
        f"parameters:     {info['params']:,}",
        f"step:           {info['step']} / {info['max_iters']}",
        f"best val loss:  {best}",
        f"checkpoints:    {', '.join(map(str, info['checkpoints'])) or 'none'}",
        *([_init_line(info["init_from"])] if info.get("init_from") else []),
        *([_lora_line(info["lora"])] if info.get("lora") else []),
        f"train memory:   {format_bytes(info['memory']['float32']['total'])} float32, "
        f"{format_bytes(info['memory']['bfloat16']['total'])} bf16 per device "
        f"(estimate at batch-size {info['train']['batch_size']}; see docs/gpu.md)",
        "model:          " + ", ".join(f"{k}={v}" for k, v in m.items()),
        "train:          " + ", ".join(f"{k}={v}" for k, v in info["train"].items()),
    ]
    return "\n".join(lines)


def _init_line(init: dict[str, Any]) -> str:
    """Where a run started from (train --init-from): the source, its step, its weights' checksum."""
    step = f"step {init['step']}, " if init["step"] is not None else ""
    return f"initialised from: {init['source']} ({step}sha256 {init['sha256']})"


def _lora_line(ad: dict[str, Any]) -> str:
    return (f"LoRA adapters:  rank {ad['rank']}, alpha {ad['alpha']:g}, on {', '.join(ad['targets'])}"
            f": {ad['adapter_params']:,} trained parameters on the frozen base {ad['base']} (step "
            f"{ad['base_step']})")


def format_presets(rows: list[dict[str, Any]], vocab_size: int = SHAKESPEARE_VOCAB) -> str:
    head = (f"{'preset':<8} {'layers':>6} {'heads':>5} {'dims':>5} {'context':>7} {'params':>12} "
            f"{'batch':>5} {'mem fp32':>10} {'mem bf16':>10}  description")
    lines = [head]
    for r in rows:
        mem = {k: format_bytes(v["total"]) for k, v in r["memory"].items()}
        lines.append(f"{r['preset']:<8} {r['n_layer']:>6} {r['n_head']:>5} {r['n_embd']:>5} "
                     f"{r['block_size']:>7} {r['params']:>12,} {r['batch_size']:>5} "
                     f"{mem['float32']:>10} {mem['bfloat16']:>10}  {r['description']}")
    what = ("Tiny Shakespeare, chars" if vocab_size == SHAKESPEARE_VOCAB else "--vocab-size")
    lines.append(f"(for a {vocab_size}-token vocabulary: {what}; mem = estimated training memory per "
                 "device at that batch size, see docs/gpu.md)")
    return "\n".join(lines)


def format_memory(row: dict[str, Any]) -> str:
    """The estimate's parts for one preset and batch size, float32 beside bf16/fp16 autocast."""
    parts = [("weights", "weights (fp32)"), ("gradients", "gradients (fp32)"),
             ("optimizer", "optimizer state"), ("autocast_copies", "autocast weight copies"),
             ("activations", "activations"), ("logits", "logits and loss"), ("total", "total")]
    mem = row["memory"]
    lines = [f"{row['preset']}: {row['params']:,} parameters, batch-size {row['batch_size']} per device "
             f"x context {row['block_size']}",
             f"{'':<24} {'float32':>10} {'bf16/fp16':>10}"]
    for key, label in parts:
        lines.append(f"{label:<24} {format_bytes(mem['float32'][key]):>10} "
                     f"{format_bytes(mem['bfloat16'][key]):>10}")
    lines.append("per device; the effective batch is batch-size x grad-accum x number of processes. "
                 "Add ~0.5 GiB for the CUDA context.")
    return "\n".join(lines)
