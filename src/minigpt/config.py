"""Configuration: model and training dataclasses, presets, TOML files and flag overrides.

Precedence, lowest to highest: dataclass defaults < preset < engine defaults < TOML file < explicit
flags/kwargs.
Every key is checked: an unknown key is an error, never silently ignored. Nothing is exec'd.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .tokenizers import bpe, kinds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Layout presets: `arch` names a value for every layout switch of ModelConfig. A switch given
# explicitly wins over its arch. "gpt2" is GPT-2's layout (and these parameter names load into other
# GPT-2 tools). "modern" is the layout that reached a given validation loss soonest on a CPU here:
# GPT-2's plus rotary position embeddings, QK-norm and a ReLU^2 MLP; RMSNorm and an untied head were
# measured too and lost at this size (docs/speed.md), so they are switches only.
ARCHS: dict[str, dict[str, Any]] = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", activation="gelu_tanh", qk_norm=False,
                 tie_embeddings=True, bias=True),
    "modern": dict(pos_emb="rope", norm="layernorm", activation="relu2", qk_norm=True,
                   tie_embeddings=True, bias=True),
}
LAYOUT_CHOICES = {
    "pos_emb": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("gelu_tanh", "gelu", "relu2"),
}


@dataclass
class ModelConfig:
    """Architecture. Everything needed to rebuild the network from config.json alone.

    The layout switches default to None = "as `arch` says"; after construction they hold concrete
    values, so config.json records exactly what was built. A config.json written before the
    switches existed has none of them and rebuilds the GPT-2 layout it was trained with.
    """

    vocab_size: int = 67
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    arch: str = "gpt2"  # gpt2 | modern: the defaults of the switches below
    bias: bool | None = None  # biases in Linear and LayerNorm
    pos_emb: str | None = None  # learned (wpe table) | rope (rotary, no parameters)
    norm: str | None = None  # layernorm | rmsnorm
    activation: str | None = None  # gelu_tanh (GPT-2) | gelu (exact) | relu2 (ReLU squared)
    qk_norm: bool | None = None  # RMS-normalise queries and keys per head
    tie_embeddings: bool | None = None  # the LM head reuses the token embedding matrix

    def __post_init__(self) -> None:
        for name, value in ARCHS.get(self.arch, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown arch {self.arch!r}; choose from {', '.join(ARCHS)}")
        for name, choices in LAYOUT_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name.replace('_', '-')} must be one of {', '.join(choices)}; "
                                  f"got {getattr(self, name)!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head size (n-embd / n-head), "
                              f"got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class TrainConfig:
    """Everything about a training run that is not the architecture.

    Defaults are nanoGPT's CPU recipe for Tiny Shakespeare (train_shakespeare_char on a laptop).
    """

    data: str | None = None  # text file(s)/dir to prepare, or a prepared data dir; None = bundled
    out: str = "runs/default"
    docs: str | None = None  # None (stream) | lines | blank | files
    val_fraction: float = 0.1
    tokenizer: str = "char"  # char | bytes | bpe
    tokenizer_vocab_size: int | None = None  # bpe vocabulary size (None = 1024); the CLI's --vocab-size
    max_iters: int = 2000
    batch_size: int = 12
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    lr: float = 1e-3  # AdamW's peak learning rate
    muon_lr: float = 0.02  # Muon's peak learning rate (optimizer muon); follows lr's schedule
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (the best one is always kept too)
    max_bad_steps: int = 5  # stop after this many steps in a row with a non-finite loss/gradient
    sample_tokens: int = 120  # length of the sample printed at each evaluation; 0 disables
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # compute precision (autocast); weights stay float32. See device.resolve_dtype
    compile: bool = False  # torch.compile the model for training
    threads: int = 0  # CPU threads; 0 = auto (the cores not busy with other processes)
    engine: str = "torch"  # torch | reference (NumPy, hand-written backward: see docs/backprop.md)

    def validate(self) -> None:
        positive = ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters",
                    "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min-lr <= lr and lr > 0, got lr={self.lr} min-lr={self.min_lr}")
        if self.warmup_iters < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("warmup-iters, weight-decay and grad-clip must be >= 0")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ConfigError(f"lr-decay-iters must be >= 1, got {self.lr_decay_iters}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.docs not in (None, "lines", "blank", "files"):
            raise ConfigError(f"docs must be one of lines, blank, files; got {self.docs!r}")
        if self.tokenizer not in kinds():
            raise ConfigError(f"unknown tokenizer {self.tokenizer!r}; choose from {', '.join(kinds())}")
        if self.tokenizer_vocab_size is not None:
            if self.tokenizer != "bpe":
                raise ConfigError(f"vocab-size applies to the bpe tokenizer only, not {self.tokenizer}")
            if not bpe.MIN_VOCAB_SIZE <= self.tokenizer_vocab_size <= bpe.MAX_VOCAB_SIZE:
                raise ConfigError(f"vocab-size must be between {bpe.MIN_VOCAB_SIZE} (256 bytes + BOS + "
                                  f"EOS) and {bpe.MAX_VOCAB_SIZE}, got {self.tokenizer_vocab_size}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"max-bad-steps must be >= 1, got {self.max_bad_steps}")
        if self.sample_tokens < 0:
            raise ConfigError("sample-tokens must be >= 0")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16; got {self.dtype!r}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = auto), got {self.threads}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.muon_lr <= 0:
            raise ConfigError(f"muon-lr must be > 0, got {self.muon_lr}")
        if self.engine not in ("torch", "reference"):
            raise ConfigError(f"engine must be torch or reference, got {self.engine!r}")


@dataclass(frozen=True)
class Preset:
    description: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


# The training recipe every preset shares (docs/speed.md has the ablation behind each choice):
# the modern layout, Muon for hidden matrices, a short warmup.
RECIPE_MODEL: dict[str, Any] = dict(arch="modern")
RECIPE_TRAIN: dict[str, Any] = dict(optimizer="muon", muon_lr=0.01, lr=3e-3, min_lr=3e-4,
                                    warmup_iters=20)

# Named after the original program's size table. Parameter counts are computed, never typed in:
# `minigpt info` shows them for the Tiny Shakespeare vocabulary.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "the original mini_gpt.rs: 1 layer, 32 dims, 4 heads, context 8",
        model=dict(RECIPE_MODEL, n_layer=1, n_head=4, n_embd=32, block_size=8),
        train=dict(RECIPE_TRAIN, batch_size=32),
    ),
    "small": Preset(
        "nanoGPT's CPU model size: 4 layers, 128 dims, 4 heads, context 64",
        model=dict(RECIPE_MODEL, n_layer=4, n_head=4, n_embd=128, block_size=64),
        train=dict(RECIPE_TRAIN, batch_size=24, max_iters=400, eval_interval=200),
    ),
    "medium": Preset(
        "6 layers, 256 dims, 8 heads, context 128",
        model=dict(RECIPE_MODEL, n_layer=6, n_head=8, n_embd=256, block_size=128),
        train=dict(RECIPE_TRAIN, batch_size=32, max_iters=5000, eval_interval=500),
    ),
    "large": Preset(
        "12 layers, 384 dims, 6 heads, context 256",
        model=dict(RECIPE_MODEL, n_layer=12, n_head=6, n_embd=384, block_size=256, dropout=0.2),
        train=dict(RECIPE_TRAIN, batch_size=64, max_iters=5000, eval_interval=500),
    ),
}
# An engine may bring defaults of its own, above the preset and below files and flags: the NumPy
# reference engine implements the GPT-2 layout and AdamW only.
ENGINE_DEFAULTS: dict[str, dict[str, Any]] = {"reference": dict(arch="gpt2", optimizer="adamw")}
DEFAULT_PRESET = "small"

MODEL_KEYS = {f.name for f in fields(ModelConfig)}
TRAIN_KEYS = {f.name for f in fields(TrainConfig)}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML file of hyperparameters (same names as the flags, with underscores)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return {k.replace("-", "_"): v for k, v in raw.items()}


def split_overrides(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat mapping into (model, train) keys; unknown keys are an error."""
    unknown = sorted(set(values) - MODEL_KEYS - TRAIN_KEYS - {"preset"})
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    model = {k: v for k, v in values.items() if k in MODEL_KEYS}
    train = {k: v for k, v in values.items() if k in TRAIN_KEYS}
    return model, train


def _typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Coerce ints to floats where the field is a float; reject wrong types with a clear message."""
    hints = {f.name: f.type for f in fields(cls)}
    out = {}
    for k, v in values.items():
        t = str(hints[k])
        if t.startswith("float") and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if v is not None:
            ok = {
                "int": isinstance(v, int) and not isinstance(v, bool),
                "float": isinstance(v, (int, float)) and not isinstance(v, bool),
                "bool": isinstance(v, bool),
                "str": isinstance(v, str),
            }
            base = t.split(" ")[0].split("|")[0].strip()
            if base in ok and not ok[base]:
                raise ConfigError(f"{k} must be {base}, got {v!r}")
        out[k] = v
    return out


def resolve(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Build (ModelConfig, TrainConfig) from defaults < preset < engine < TOML file < overrides."""
    values: dict[str, Any] = load_toml(config_file) if config_file else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    preset = values.pop("preset", None) or preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    model_over, train_over = split_overrides(values)
    p = PRESETS[preset]
    engine = train_over.get("engine") or p.train.get("engine") or "torch"
    engine_model, engine_train = split_overrides(ENGINE_DEFAULTS.get(engine, {}))
    mcfg = ModelConfig(**_typed(ModelConfig, {**p.model, **engine_model, **model_over}))
    tcfg = TrainConfig(**_typed(TrainConfig, {**p.train, **engine_train, **train_over}))
    mcfg.validate()
    tcfg.validate()
    return mcfg, tcfg


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    unknown = sorted(set(d) - MODEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown model setting(s): {', '.join(unknown)}")
    cfg = ModelConfig(**_typed(ModelConfig, d))
    cfg.validate()
    return cfg


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    unknown = sorted(set(d) - TRAIN_KEYS)
    if unknown:
        raise ConfigError(f"unknown train setting(s): {', '.join(unknown)}")
    return TrainConfig(**_typed(TrainConfig, d))


def to_json(mcfg: ModelConfig, tcfg: TrainConfig | None = None) -> str:
    d: dict[str, Any] = {"model": dataclasses.asdict(mcfg)}
    if tcfg is not None:
        d["train"] = dataclasses.asdict(tcfg)
    return json.dumps(d, indent=2, sort_keys=True) + "\n"
