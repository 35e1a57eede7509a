"""`minigpt export RUN --merge --out DIR`: a LoRA run as a full run directory, adapters folded in.

DIR is an ordinary minigpt run (config.json without LoRA, tokenizer.json, metrics.jsonl, the
prepared data when the run has its own, and one checkpoint at the exported step holding every
weight, marked best) that needs its base no more: sample, serve, eval, export and --init-from take
it as any other run. It cannot be resumed (its optimizer state was the adapters'); its meta.json
names the run, step and adapter SHA-256 it was merged from. DIR is written beside itself and
renamed into place, so a failed merge leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from .. import lora, rundir
from ..errors import ConfigError
from ..fsio import replaced_dir


def export_merged(run_dir: str | Path, out: str | Path, checkpoint: str = "best",
                  overwrite: bool = False) -> dict[str, Any]:
    """Write LoRA run `run_dir`'s `checkpoint` with its adapters folded in as the run `out`."""
    run_dir, out = Path(run_dir), Path(os.path.abspath(out))
    mcfg, tcfg = rundir.read_config(run_dir)
    if not mcfg.lora_rank:
        raise ConfigError(f"--merge folds LoRA adapters into their base, and {run_dir} has none: "
                          "it is a full run already")
    _check_out(out, run_dir, overwrite)
    model, meta = ckpt.load_model(run_dir, checkpoint)
    full = lora.merged(model)
    with replaced_dir(out) as tmp:
        rundir.write_config(tmp, full.config, dataclasses.replace(tcfg, out=str(out)))
        rundir.write_tokenizer(tmp, rundir.read_tokenizer(run_dir))
        for name in (rundir.METRICS, rundir.CHAT_TEMPLATE, "data"):
            src = run_dir / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        origin = {"run": str(run_dir.resolve()), "step": meta["step"],
                  "sha256": meta["sha256"][ckpt.ADAPTER]}
        kept = {k: meta.get(k) for k in ("val_loss", "train_loss", "best_val_loss", "data_tokens")}
        ckpt.save_checkpoint(tmp, meta["step"], full, None, {**kept, "merged_from": origin},
                             keep=1, is_best=True)
    return {"run_dir": str(run_dir), "out": str(out), "step": meta["step"],
            "params": full.num_params(), "base": tcfg.init_from}


def _check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    if out.resolve() == run_dir.resolve():
        raise ConfigError("--out must be a new directory, not the LoRA run itself")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it, or "
                              "choose another --out")
        if not rundir.is_run_dir(out):
            raise ConfigError(f"{out} is not a minigpt run directory; --overwrite replaces only an "
                              "earlier merge, choose another --out")
