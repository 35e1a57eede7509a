"""Checkpoints: save, find, verify, prune and load them back safely.

    RUN/checkpoints/step-0000500/{model.safetensors, trainer.pt, meta.json}
    RUN/checkpoints/best.json  {"step": ..., "val_loss": ...}: which step is the best (rundir.py)

A LoRA run's checkpoints hold adapter.safetensors (the adapters alone) in place of model.safetensors:
its frozen base is the checkpoint of the --init-from run that config.json names by path, step and
SHA-256 (TrainConfig.init_*), read from there at every load (`base_state`) and refused, in one
line, when it is gone or its weights changed.

Each checkpoint is written into a temporary directory, every file fsynced, then renamed into place, so a
crash never leaves a half-written checkpoint under a real name; meta.json holds SHA-256 checksums, so a
truncated or corrupted file is detected at load time. Weights are safetensors; trainer state (optimizer
moments, RNG, sampler) is loaded with `torch.load(weights_only=True)`, which cannot execute code.
A failed save (disk full, unwritable directory) raises a one-line CheckpointError and leaves every
earlier checkpoint as it was; a checkpoint never holds non-finite weights.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import lora, rundir
from .config import ModelConfig, TrainConfig
from .errors import CheckpointError
from .fsio import atomic_write_text, fsync_dir, sha256_file
from .model import GPT
from .rundir import FORMAT_VERSION, checkpoints_dir

WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"  # a LoRA run's checkpoints: the adapters, without their base
TRAINER = "trainer.pt"
META = "meta.json"


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


def read_weights(path: Path, framework: str = "pt") -> dict[str, Any]:
    """A safetensors file as torch tensors ("pt") or NumPy arrays ("numpy"); a bad file is one line."""
    from safetensors.numpy import load_file as load_numpy

    try:
        return load_file(str(path)) if framework == "pt" else load_numpy(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights {path}: {e}") from None


def weights_file(cfg: ModelConfig) -> str:
    """The name of the weights file in a checkpoint of a model of `cfg`."""
    return ADAPTER if cfg.lora_rank else WEIGHTS


def saved_state(model: GPT) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of `model`: every weight, or a LoRA model's adapters alone."""
    return lora.adapter_state(model) if model.config.lora_rank else weights_state(model)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    load_state(model, read_weights(path), path)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str,
               part: str = "all") -> None:
    """Copy `state` (minigpt names, tied tensors once) into `model`, refusing any name or shape
    that does not match; `path` names where the weights came from in the error. `part`: "all"
    of the model's tensors, its "base" (all but LoRA adapters) or its "adapter"s alone."""
    names = {k for k in model.state_dict()
             if part == "all" or lora.is_adapter(k) == (part == "adapter")}
    tied = {k for k in names if k not in weights_state(model)}
    missing = names - set(state) - tied
    unexpected = set(state) - names
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {path} do not match the model config "
            f"(missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})"
        )
    expected = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            hint = " (a different vocabulary?)" if name in ("wte.weight", "lm_head.weight") else ""
            raise CheckpointError(
                f"weights in {path} do not match this run's model{hint}: {name} is "
                f"{list(tensor.shape)} in the checkpoint, {list(expected[name].shape)} in the model"
            )
    model.load_state_dict(state, strict=False)


def fit_positions(state: dict[str, torch.Tensor], block_size: int) -> dict[str, torch.Tensor]:
    """`state` for a model of a context up to its own: a learned position table cut to
    `block_size` rows, which computes exactly what the full one does on contexts that short."""
    wpe = state.get("wpe.weight")
    if wpe is not None and wpe.size(0) > block_size:
        state = {**state, "wpe.weight": wpe[:block_size].clone()}
    return state


def base_state(run_dir: Path, mcfg: ModelConfig, tcfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The frozen base weights of LoRA run `run_dir`: its --init-from run's checkpoint at the
    recorded step, checked against the recorded SHA-256."""
    base, step = tcfg.init_from, tcfg.init_step
    if base is None or step is None or tcfg.init_sha256 is None:
        raise CheckpointError(f"{run_dir} is a LoRA run whose config.json does not name its base "
                              "run (init_from, init_step, init_sha256)")
    where = checkpoints_dir(Path(base)) / step_dir_name(step)
    if not where.is_dir():
        raise CheckpointError(f"{run_dir} holds LoRA adapters for the base run {base} at step "
                              f"{step}, which is not there any more; put that checkpoint back, or "
                              "train the adapters again")
    meta = verify_checkpoint(where)
    if meta["sha256"].get(WEIGHTS) != tcfg.init_sha256:
        raise CheckpointError(f"{run_dir} holds LoRA adapters for the weights of {base} at step "
                              f"{step}, and those weights changed since (SHA-256 differs); train "
                              "the adapters again on the new base")
    return fit_positions(read_weights(where / WEIGHTS), mcfg.block_size)


def load_checkpoint(model: GPT, path: Path, run_dir: Path, tcfg: TrainConfig) -> None:
    """Load checkpoint `path` of `run_dir` into `model`: its weights, or a LoRA run's base and
    adapters."""
    if not model.config.lora_rank:
        return load_weights(model, path / WEIGHTS)
    load_state(model, base_state(run_dir, model.config, tcfg), tcfg.init_from or "", "base")
    load_state(model, read_weights(path / ADAPTER), path / ADAPTER, "adapter")


def load_model(run_dir: Path, which: str = "best") -> tuple[GPT, dict[str, Any]]:
    """The model of a run at checkpoint `which` (see find_for_inference), on the CPU in float32,
    in eval mode; -> (model, the checkpoint's meta.json)."""
    mcfg, tcfg = rundir.read_config(run_dir)
    path, meta = find_for_inference(run_dir, which)
    model = GPT(mcfg)
    load_checkpoint(model, path, Path(run_dir), tcfg)
    return model.eval(), meta


# --- checkpoints ---------------------------------------------------------------------------------


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
    """Write checkpoint `step` atomically; update best.json; keep the newest `keep` (+ the best).

    Any failure (disk full, unwritable directory, a crash) leaves the earlier checkpoints untouched.
    """
    root = checkpoints_dir(run_dir)
    weights = saved_state(model)
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to save checkpoint at step {step}: {bad[0]} holds NaN or inf")
    try:
        final = _write_checkpoint(root, step, {weights_file(model.config): weights}, trainer_state,
                                  meta)
        if is_best:
            rundir.write_best(run_dir, step, meta.get("val_loss"))
    except OSError as e:
        intact = [s for s, _ in list_checkpoints(run_dir) if s != step]
        kept = f"checkpoint at step {intact[-1]} is intact" if intact else "no earlier checkpoint exists"
        raise CheckpointError(
            f"cannot save checkpoint at step {step} in {root}: {e.strerror or e} ({kept})"
        ) from None
    prune_checkpoints(run_dir, keep, current=step)
    return final


def _write_checkpoint(root: Path, step: int, weights: dict[str, dict[str, torch.Tensor]],
                      trainer_state: dict[str, Any] | None, meta: dict[str, Any]) -> Path:
    """Write into a temp dir, fsync every file, then rename it to its final name. `weights`:
    file name -> tensors."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for name, tensors in weights.items():
            save_file(tensors, str(tmp / name))
        files = list(weights)
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
    return final


def best_step(run_dir: Path) -> int | None:
    """The step best.json points to, if that checkpoint exists (it may have been set aside)."""
    best = rundir.read_best(run_dir)
    if best is None:
        return None
    return best["step"] if (checkpoints_dir(run_dir) / step_dir_name(best["step"])).is_dir() else None


def prune_checkpoints(run_dir: Path, keep: int, current: int | None = None) -> None:
    """Delete all but the newest `keep` checkpoints, never the best or `current`; clear crash leftovers."""
    protected = {best_step(run_dir), current}
    ckpts = list_checkpoints(run_dir)
    for step, path in ckpts[: max(0, len(ckpts) - keep)]:
        if step not in protected:  # rename first: a kill mid-delete must not leave half a checkpoint
            trash = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
    remove_stale_temp(run_dir)


# .tmp-step-0000500-PID / .old-step-0000500-PID (checkpoint dirs), .config.json.tmp-PID (atomic writes)
_TEMP_NAME = re.compile(r"^\.((tmp|old)-step-\d+|.+\.tmp)-\d+$")


def remove_stale_temp(run_dir: Path) -> None:
    """Remove temp files and dirs that processes which died mid-write left behind (not our own)."""
    mine = f"-{os.getpid()}"
    for d in (Path(run_dir), checkpoints_dir(run_dir)):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if _TEMP_NAME.match(p.name) and not p.name.endswith(mine):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def set_aside_damaged(run_dir: Path, after_step: int) -> list[Path]:
    """Rename checkpoints newer than `after_step` (the newest intact one) to damaged-step-N.

    A resumed run writes those steps again; keeping the damaged copies under their real names
    would let pruning, which keeps the newest steps, delete the fresh checkpoints instead.
    """
    moved = []
    for step, path in list_checkpoints(run_dir):
        if step > after_step:
            target = path.with_name("damaged-" + path.name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return the checkpoint's meta.json after checking every file against its checksum."""
    try:
        meta = json.loads((path / META).read_text())
        sums = dict(meta["sha256"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {META} is missing") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} has a corrupted {META}") from None
    rundir.check_format(meta, path)
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
    damaged = []
    for _, path in reversed(ckpts):
        try:
            return path, verify_checkpoint(path), [f"skipping damaged checkpoint: {e}" for e in damaged]
        except CheckpointError as e:
            damaged.append(str(e))
    raise CheckpointError(f"every checkpoint in {run_dir} is damaged: " + "; ".join(damaged))


def find_for_inference(run_dir: Path, which: str = "best") -> tuple[Path, dict[str, Any]]:
    """The checkpoint to generate from: "best" falls back to "last" for a run stopped before its
    first evaluation, which has no best yet."""
    if which == "best" and best_step(run_dir) is None:
        which = "last"
    path, meta, _ = find_checkpoint(run_dir, which)
    return path, meta


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Optimizer/RNG/sampler state. weights_only=True: a pickle that would run code is refused."""
    f = path / TRAINER
    if not f.exists():
        raise CheckpointError(f"checkpoint {path} has no trainer state ({TRAINER}); cannot resume")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols: noise here
            warnings.simplefilter("ignore")
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is many lines, one of which suggests weights_only=False: quote only the cause
        lines = [ln.strip() for ln in str(e).splitlines()]
        cause = next((ln for ln in lines if ln.startswith(("Trying to load", "Unsupported"))), "")
        cause = f" ({cause.rstrip('.')})" if cause else ""
        raise CheckpointError(
            f"refusing to load {f}: it is not plain tensor data and loading it could run code{cause}; "
            "use checkpoints only from sources you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read {f}: {first}") from None
