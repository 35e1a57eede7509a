"""What a run or a preset is: config, parameter count, step, best validation loss."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import PRESETS, resolve
from .model import GPT

# Tiny Shakespeare's 65 characters + BOS + EOS: the vocabulary preset parameter counts are quoted for
SHAKESPEARE_VOCAB = 67


def preset_rows(vocab_size: int = SHAKESPEARE_VOCAB) -> list[dict[str, Any]]:
    rows = []
    for name, preset in PRESETS.items():
        mcfg, tcfg = resolve(name, overrides={"vocab_size": vocab_size})
        rows.append({
            "preset": name,
            "n_layer": mcfg.n_layer, "n_head": mcfg.n_head, "n_embd": mcfg.n_embd,
            "block_size": mcfg.block_size, "params": GPT(mcfg).num_params(),
            "batch_size": tcfg.batch_size, "description": preset.description,
        })
    return rows


def run_info(run_dir: Path) -> dict[str, Any]:
    mcfg, tcfg = ckpt.read_run_config(run_dir)
    ckpts = ckpt.list_checkpoints(run_dir)
    best = ckpt.best_step(run_dir)
    best_val = None
    if best is not None:
        try:
            best_val = json.loads((ckpt.checkpoints_dir(run_dir) / ckpt.BEST).read_text())["val_loss"]
        except (OSError, ValueError, KeyError):
            pass
    return {
        "run_dir": str(run_dir),
        "params": GPT(mcfg).num_params(),
        "step": ckpts[-1][0] if ckpts else 0,
        "max_iters": tcfg.max_iters,
        "best_step": best,
        "best_val_loss": best_val,
        "checkpoints": [s for s, _ in ckpts],
        "model": dataclasses.asdict(mcfg),
        "train": dataclasses.asdict(tcfg),
    }


def format_run_info(info: dict[str, Any]) -> str:
    m = info["model"]
    best = f"{info['best_val_loss']:.4f} at step {info['best_step']}" if info["best_val_loss"] else "none yet"
    lines = [
        f"run:            {info['run_dir']}",
        f"parameters:     {info['params']:,}",
        f"step:           {info['step']} / {info['max_iters']}",
        f"best val loss:  {best}",
        f"checkpoints:    {', '.join(map(str, info['checkpoints'])) or 'none'}",
        "model:          " + ", ".join(f"{k}={v}" for k, v in m.items()),
        "train:          " + ", ".join(f"{k}={v}" for k, v in info["train"].items()),
    ]
    return "\n".join(lines)


def format_presets(rows: list[dict[str, Any]]) -> str:
    head = f"{'preset':<8} {'layers':>6} {'heads':>5} {'dims':>5} {'context':>7} {'params':>12}  description"
    lines = [head]
    for r in rows:
        lines.append(f"{r['preset']:<8} {r['n_layer']:>6} {r['n_head']:>5} {r['n_embd']:>5} "
                     f"{r['block_size']:>7} {r['params']:>12,}  {r['description']}")
    lines.append(f"(parameter counts for a {SHAKESPEARE_VOCAB}-token vocabulary: Tiny Shakespeare, chars)")
    return "\n".join(lines)
