"""`train --init-from SRC`: what SRC is, what the new run takes from it, and what it records.

SRC is a minigpt run directory (its best checkpoint, or `--init-checkpoint last|STEP`), a local
Hugging Face GPT-2, GPT-NeoX, Llama, Persimmon or Qwen3 directory (hf_import.py), or a Hub name
such as `gpt2`, downloaded with `huggingface_hub.snapshot_download` (safetensors, config and
tokenizer files only). The model config and the tokenizer come from SRC; a model flag that contradicts SRC is refused, except
`--dropout` (a training setting; 0 unless given) and a smaller `--block-size` (the learned position table is cut,
which computes exactly what the source does on contexts up to that length). The run records the
source, its step and the SHA-256 of its weights file in config.json (TrainConfig.init_*).

With `--lora-rank R` the source is the run's frozen base, loaded again from that record at every
load of the run (checkpoint.base_state), so it must be a minigpt run directory with no adapters of
its own. A LoRA run as the source of a full fine-tune gives its weights with the adapters folded in.

Everything here runs before the run directory is claimed, so a refused SRC writes nothing.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from .. import lora, rundir
from ..config import ModelConfig, TrainConfig, resolve_finetune
from ..errors import CheckpointError, ConfigError
from ..tokenization import Tokenizer
from . import hf_import

# owner/name or name, as the Hub spells repository ids
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# what a model directory needs; never a pickle
HUB_FILES = ["config.json", "*.safetensors", hf_import.WEIGHTS_INDEX, "tokenizer.json",
             "vocab.json", "merges.txt"]
# model settings a fine-tune may set for itself (see the module docstring)
OWN_SETTINGS = ("dropout", "block_size", "lora_rank", "lora_alpha", "lora_targets")


@dataclass
class InitSource:
    source: str  # an absolute path, or a Hub name
    kind: str  # "minigpt" or "hf"
    step: int | None  # the checkpoint's step (minigpt runs)
    sha256: str  # of the weights file
    model: ModelConfig
    tokenizer: Tokenizer
    state: dict[str, torch.Tensor]  # minigpt names and layout
    adapters: bool = False  # a LoRA run's weights, folded: not a base for adapters of its own


def resolve_source(src: str, checkpoint: str | None = None) -> InitSource:
    """Read SRC's model config, tokenizer and weights; anything unusable is one line."""
    path = Path(src)
    if path.exists():
        return _local_source(path, checkpoint)
    if not HUB_ID.match(src) or src.startswith((".", "/", "~")):
        raise CheckpointError(f"--init-from {src}: no such directory")
    if checkpoint is not None:
        raise ConfigError("--init-checkpoint applies to an --init-from minigpt run, not a Hub model")
    return dataclasses.replace(_hf_source(_download(src)), source=src)


def _local_source(path: Path, checkpoint: str | None) -> InitSource:
    if not path.is_dir():
        raise CheckpointError(f"--init-from {path} is a file; give a minigpt run directory, a "
                              "Hugging Face model directory or a Hub name")
    if hf_import.is_hf_dir(path):
        if checkpoint is not None:
            raise ConfigError("--init-checkpoint applies to an --init-from minigpt run, not a "
                              "Hugging Face directory")
        return _hf_source(path)
    if rundir.is_run_dir(path):
        return _run_source(path, checkpoint or "best")
    raise CheckpointError(f"--init-from {path} is neither a minigpt run (config.json and "
                          "checkpoints/) nor a Hugging Face model directory (config.json with a "
                          "model_type)")


def _run_source(path: Path, which: str) -> InitSource:
    mcfg, _ = rundir.read_config(path)
    tok = rundir.read_tokenizer(path)
    if tok.vocab_size != mcfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model "
                              f"expects {mcfg.vocab_size}")
    if mcfg.lora_rank:  # base and adapters, folded into one set of weights
        model, meta = ckpt.load_model(path, which)
        state = ckpt.weights_state(lora.merged(model))
    else:
        where, meta = ckpt.find_for_inference(path, which)  # checks every file's checksum
        state = ckpt.read_weights(where / ckpt.WEIGHTS)
    return InitSource(str(path.resolve()), "minigpt", int(meta["step"]),
                      meta["sha256"][ckpt.weights_file(mcfg)], lora.base_config(mcfg), tok,
                      state, adapters=mcfg.lora_rank > 0)


def _hf_source(path: Path) -> InitSource:
    mcfg, state, tok, digest = hf_import.load_hf_dir(path)
    return InitSource(str(Path(path).resolve()), "hf", None, digest, mcfg, tok, state)


def _download(repo_id: str) -> Path:
    """A Hub snapshot (config, tokenizer, safetensors only), cached by huggingface_hub."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"--init-from {repo_id}: not a local directory, and downloading it from "
                          "the Hugging Face Hub needs huggingface_hub: pip install "
                          "'minigpt[hf]'") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated, HTTP errors: many types, one message
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"--init-from {repo_id}: not a local directory, and downloading it "
                              f"from the Hugging Face Hub failed ({type(e).__name__}: "
                              f"{reason})") from None


def model_for_run(source: InitSource, given: dict[str, Any]) -> ModelConfig:
    """SRC's model config, with the settings a fine-tune may choose; any other model setting given
    must agree with SRC. Cuts `source.state`'s position table to a smaller block size."""
    cfg = source.model
    own = {k: given[k] for k in OWN_SETTINGS if k in given}
    if not own.get("lora_rank") and {"lora_alpha", "lora_targets"} & set(own):
        raise ConfigError("--lora-alpha and --lora-targets shape LoRA adapters: give --lora-rank R")
    if own.get("lora_rank"):
        _check_lora_base(source)
    for key, value in given.items():
        if key not in own and getattr(cfg, key) != value:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} {value} contradicts the --init-from model ({key} "
                              f"{getattr(cfg, key)}); the model comes from its source: drop {flag}")
    block = own.get("block_size", cfg.block_size)
    if block > cfg.block_size:
        raise ConfigError(f"--block-size {block} is larger than the --init-from model's "
                          f"{cfg.block_size}, which has no positions beyond that")
    source.state = ckpt.fit_positions(source.state, block)
    # dropout is a training setting, not part of what the source learnt: 0 unless asked for, as in
    # nanoGPT's fine-tuning config
    adapters = {k: own[k] for k in ("lora_rank", "lora_alpha", "lora_targets") if k in own}
    out = dataclasses.replace(cfg, block_size=block, dropout=own.get("dropout", 0.0), **adapters)
    out.validate()
    return out


def _check_lora_base(source: InitSource) -> None:
    """A LoRA run's base is read again at every load: a minigpt run without adapters of its own."""
    why = f"--lora-rank trains adapters on a base that every load of the run reads again, and " \
          f"--init-from {source.source} is"
    if source.adapters:
        raise ConfigError(f"{why} a LoRA run: export it as a full run first (minigpt export SRC "
                          "--merge --out DIR), or train it without --lora-rank")
    if source.kind != "minigpt":
        raise ConfigError(f"{why} a Hugging Face model: make it a minigpt run first (a full "
                          "--init-from run), or train it without --lora-rank")


def init_config(config_file: str | Path | None,
                overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig, InitSource]:
    """(model config, train config, source) of a new run with --init-from."""
    model_over, tcfg = resolve_finetune(config_file, overrides)
    if tcfg.backend != "torch":
        raise ConfigError("--init-from trains with the torch backend; drop --backend reference")
    source = resolve_source(tcfg.init_from, tcfg.init_checkpoint)
    mcfg = model_for_run(source, model_over)
    tcfg = dataclasses.replace(tcfg, tokenizer=source.tokenizer.kind, tokenizer_vocab_size=None,
                               init_from=source.source, init_step=source.step,
                               init_sha256=source.sha256)
    return mcfg, tcfg, source


def source_again(tcfg: TrainConfig) -> InitSource:
    """The recorded source of a run being resumed before its first checkpoint: the same weights,
    checked by their SHA-256, or a refusal."""
    which = str(tcfg.init_step) if tcfg.init_step is not None else tcfg.init_checkpoint
    source = resolve_source(tcfg.init_from, which)
    if source.sha256 != tcfg.init_sha256:
        raise CheckpointError(f"cannot resume: the --init-from weights in {tcfg.init_from} changed "
                              "since the run started (SHA-256 differs); train a new run")
    return source
