"""The run directory's own files: every read and write of them goes through here.

    RUN/config.json            model + train config (JSON; rebuilds the model with no flags)
    RUN/tokenizer.json         the tokenizer (JSON, never pickle)
    RUN/metrics.jsonl          one JSON object per log/eval step
    RUN/data/                  prepared data, when `train --data` was given raw text
    RUN/checkpoints/           one directory per saved step (checkpoint.py) and best.json
    RUN/chat_template.json     how `serve` renders chat messages: written by `train --chat` (the
                               template the conversations were rendered with), or by the user;
                               a run without one serves with the default template

A new run claims its directory through `new_run_dir`, which puts everything back if setting the run
up fails. Files written by an earlier minigpt keep loading: renamed config keys are read under their
new names (config.py), and a file from a *newer* minigpt is refused with a one-line error.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import (
    ModelConfig,
    TrainConfig,
    model_config_from_dict,
    to_json,
    train_config_from_dict,
)
from .errors import CheckpointError, ConfigError
from .fsio import atomic_write_text
from .tokenization import Tokenizer, load_tokenizer, save_tokenizer

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
BEST = "best.json"
CHAT_TEMPLATE = "chat_template.json"

# Written into every checkpoint's and data directory's meta.json. Bump it when a change means an
# older minigpt would misread the files; this code reads every version up to it.
FORMAT_VERSION = 1


def check_format(meta: dict[str, Any], where: Path) -> None:
    """A file written by a newer minigpt than this one: refuse it rather than misread it."""
    version = meta.get("format", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{where} was written in format {version!r}, newer than this minigpt "
                              f"reads ({FORMAT_VERSION}); upgrade minigpt to use it")


# --- config.json ---------------------------------------------------------------------------------


def write_config(run_dir: Path, mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    atomic_write_text(Path(run_dir) / CONFIG, to_json(mcfg, tcfg))


def read_config(run_dir: Path) -> tuple[ModelConfig, TrainConfig]:
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


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).exists()


# --- tokenizer.json ------------------------------------------------------------------------------


def write_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> None:
    save_tokenizer(tokenizer, Path(run_dir) / TOKENIZER)


def read_tokenizer(run_dir: Path) -> Tokenizer:
    return load_tokenizer(Path(run_dir) / TOKENIZER)


# --- chat_template.json -------------------------------------------------------------------------


def write_chat_template(run_dir: Path, template: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / CHAT_TEMPLATE, json.dumps(template, indent=2) + "\n")


def read_chat_template(run_dir: Path) -> Any | None:
    """The run's chat template as parsed JSON (chat_template.py checks it), or None when it has none."""
    path = Path(run_dir) / CHAT_TEMPLATE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


# --- metrics.jsonl -------------------------------------------------------------------------------


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS


def _parsed_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if isinstance(row, dict):
            yield line, row


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every logged row, skipping a line a crash tore in half."""
    path = metrics_path(run_dir)
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no {METRICS}; is it a minigpt run directory?")
    return [row for _, row in _parsed_lines(path)]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log matches the resumed state."""
    path = metrics_path(run_dir)
    if not path.exists():
        return
    kept = [line for line, row in _parsed_lines(path)
            if isinstance(row.get("iter"), int) and row["iter"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# --- checkpoints/best.json -----------------------------------------------------------------------


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def write_best(run_dir: Path, step: int, val_loss: float | None) -> None:
    atomic_write_text(checkpoints_dir(run_dir) / BEST,
                      json.dumps({"step": step, "val_loss": val_loss}) + "\n")


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """{"step", "val_loss"} of the best checkpoint, or None when there is no readable best.json."""
    try:
        best = json.loads((checkpoints_dir(run_dir) / BEST).read_text())
        return {"step": int(best["step"]), "val_loss": best.get("val_loss")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- claiming the directory ----------------------------------------------------------------------


@contextmanager
def new_run_dir(run_dir: Path, overwrite: bool, mcfg: ModelConfig, tcfg: TrainConfig) -> Iterator[None]:
    """Claim --out for a new run; if setting it up fails, --out is left exactly as it was.

    Never writes over someone's files: an existing run needs --resume or --overwrite, and the run
    being overwritten is only deleted once the new one is set up.
    """
    replaced = None
    if run_dir.exists() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise ConfigError(f"{run_dir} exists and is not a minigpt run directory; choose another --out")
        if not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over"
            )
        replaced = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
        run_dir.replace(replaced)
    created = run_dir  # the top-most directory this call creates
    while not created.parent.exists():
        created = created.parent
    existed = run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # config.json first: it marks the directory as a run, so a kill during set-up is resumable
        write_config(run_dir, mcfg, tcfg)
        yield
    except BaseException:
        if existed:  # it was empty: empty it again
            for p in run_dir.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        else:
            shutil.rmtree(created, ignore_errors=True)
        if replaced is not None:
            replaced.replace(run_dir)
        raise
    if replaced is not None:
        shutil.rmtree(replaced)
