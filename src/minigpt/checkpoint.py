"""Run-directory IO: atomic file writes, checkpoints, and loading them back safely.

A run directory is self-contained:

    RUN/config.json            model + train config (JSON; rebuilds the model with no flags)
    RUN/tokenizer.json         the tokenizer (JSON, never pickle)
    RUN/metrics.jsonl          one JSON object per log/eval step
    RUN/data/                  prepared data, when `train --data` was given raw text
    RUN/checkpoints/step-0000500/{model.safetensors, trainer.pt, meta.json}
    RUN/checkpoints/best.json  {"step": ..., "val_loss": ...}: which step is the best

Each checkpoint is written into a temporary directory, every file fsynced, then renamed into place, so a
crash never leaves a half-written checkpoint under a real name; meta.json holds SHA-256 checksums, so a
truncated or corrupted file is detected at load time. Weights are safetensors; trainer state (optimizer
moments, RNG, sampler) is loaded with `torch.load(weights_only=True)`, which cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, TrainConfig, model_config_from_dict, train_config_from_dict
from .errors import CheckpointError, ConfigError

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
WEIGHTS = "model.safetensors"
TRAINER = "trainer.pt"
META = "meta.json"
BEST = "best.json"
FORMAT_VERSION = 1


# --- atomic writes -------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; nothing more we can do there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then os.replace: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- weights -------------------------------------------------------------------------------------


def weights_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without tied duplicates (safetensors stores each tensor once)."""
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().to("cpu").contiguous()
    return out


def load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights {path}: {e}") from None
    tied = {k for k in model.state_dict() if k not in weights_state(model)}
    missing = set(model.state_dict()) - set(state) - tied
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {path} do not match the model config "
            f"(missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"weights in {path} do not match the model config: {first}") from None


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory with a final name, oldest first."""
    d = checkpoints_dir(run_dir)
    out = []
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                out.append((int(p.name[5:]), p))
    return sorted(out)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any] | None,
    meta: dict[str, Any],
    keep: int = 2,
    is_best: bool = False,
) -> Path:
    """Write checkpoint `step` atomically; update best.json; keep the newest `keep` (+ the best)."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(weights_state(model), str(tmp / WEIGHTS))
        files = [WEIGHTS]
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
            files.append(TRAINER)
        for name in files:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        meta = {**meta, "step": step, "format": FORMAT_VERSION,
                "sha256": {name: sha256_file(tmp / name) for name in files}}
        atomic_write_text(tmp / META, json.dumps(meta, indent=2) + "\n")
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. Ctrl-C right after an eval): swap, then drop old
            old = root / f".old-{step_dir_name(step)}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_best:
        atomic_write_text(root / BEST, json.dumps({"step": step, "val_loss": meta.get("val_loss")}) + "\n")
    prune_checkpoints(run_dir, keep)
    return final


def best_step(run_dir: Path) -> int | None:
    try:
        return int(json.loads((checkpoints_dir(run_dir) / BEST).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, never the best one; clear crash leftovers."""
    best = best_step(run_dir)
    ckpts = list_checkpoints(run_dir)
    for step, path in ckpts[: max(0, len(ckpts) - keep)]:
        if step != best:
            shutil.rmtree(path, ignore_errors=True)
    for p in checkpoints_dir(run_dir).glob(".tmp-*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return the checkpoint's meta.json after checking every file against its checksum."""
    try:
        meta = json.loads((path / META).read_text())
        sums = meta["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {META} is missing") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} has a corrupted {META}") from None
    for name, expected in sums.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256_file(f) != expected:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} fails its checksum")
    return meta


def find_checkpoint(run_dir: Path, which: str = "last") -> tuple[Path, dict[str, Any], list[str]]:
    """Locate an intact checkpoint: "last" (newest intact), "best", or a step number.

    Returns (path, meta, warnings); warnings name the damaged checkpoints that were skipped.
    """
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"no checkpoint found in {run_dir}")
    if which == "best":
        step = best_step(run_dir)
        candidates = [p for s, p in ckpts if s == step] if step is not None else []
        if not candidates:
            raise CheckpointError(f"{run_dir} has no best checkpoint (no evaluation finished yet?)")
        return candidates[0], verify_checkpoint(candidates[0]), []
    if which != "last":
        if not str(which).isdigit():
            raise CheckpointError(f"checkpoint must be best, last or a step number, got {which!r}")
        matches = [p for s, p in ckpts if s == int(which)]
        if not matches:
            raise CheckpointError(f"{run_dir} has no checkpoint at step {which}")
        return matches[0], verify_checkpoint(matches[0]), []
    warnings = []
    for _, path in reversed(ckpts):
        try:
            return path, verify_checkpoint(path), warnings
        except CheckpointError as e:
            warnings.append(f"skipping damaged checkpoint: {e}")
    raise CheckpointError(f"every checkpoint in {run_dir} is damaged; " + "; ".join(warnings))


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Optimizer/RNG/sampler state. weights_only=True: a pickle that would run code is refused."""
    f = path / TRAINER
    if not f.exists():
        raise CheckpointError(f"checkpoint {path} has no trainer state ({TRAINER}); cannot resume")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"refusing to load {f}: not plain tensor data ({reason})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from None


# --- run directory -------------------------------------------------------------------------------


def write_run_config(run_dir: Path, mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    from .config import to_json

    atomic_write_text(Path(run_dir) / CONFIG, to_json(mcfg, tcfg))


def read_run_config(run_dir: Path) -> tuple[ModelConfig, TrainConfig]:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a minigpt run directory (no {CONFIG})")
    try:
        d = json.loads(path.read_text())
        return model_config_from_dict(d["model"]), train_config_from_dict(d.get("train", {}))
    except (ValueError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} is corrupted or from another tool: {e}") from None
