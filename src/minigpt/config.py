"""Configuration: model and training dataclasses, presets, TOML files and flag overrides.

Precedence, lowest to highest: dataclass defaults < preset < backend defaults < TOML file < explicit
flags/kwargs; the last two are merged in one place (`given_settings`) for new, resumed and
fine-tuning runs alike. Each field carries its help text and choices (`option`), from which the CLI builds
its flags, so a new setting is added in one place.
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
from .structured import Constraint
from .tokenization import bpe, kinds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Layout presets: `arch` names a value for every layout switch of ModelConfig. A switch given
# explicitly wins over its arch. "gpt2" is GPT-2's layout (and these parameter names load into other
# GPT-2 tools). "stablelm", the default recipe's, is StableLM's layout, which both transformers
# (StableLmForCausalLM) and llama.cpp (stablelm) compute exactly: LayerNorm, rotary positions, a
# per-head LayerNorm QK-norm with learnt gains before the rotation, SwiGLU, no biases, tied
# embeddings; at equal CPU time it trained as well as "modern" (docs/speed.md). "modern", the
# default until 0.5, is GPT-2's layout plus rotary position embeddings, QK-norm and a ReLU^2 MLP;
# it exports to transformers (Persimmon) but to no llama.cpp architecture. Its QK-norm comes before
# the rotation (Persimmon's order), which trained as well as the order minigpt had before
# (docs/speed.md); runs made before then keep theirs (OLD_RUN_SWITCHES). "portable" is Qwen3's
# layout (transformers Qwen3ForCausalLM, llama.cpp qwen3): stablelm's with RMSNorm, whose step
# costs more on a CPU (docs/speed.md). RMSNorm and an untied head lost at this size as switches of
# the modern layout, so they stay switches only.
ARCHS: dict[str, dict[str, Any]] = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", activation="gelu_tanh", qk_norm=False,
                 qk_norm_order="after_rope", qk_norm_weight=False, tie_embeddings=True, bias=True),
    "modern": dict(pos_emb="rope", norm="layernorm", activation="relu2", qk_norm=True,
                   qk_norm_order="before_rope", qk_norm_weight=False, tie_embeddings=True,
                   bias=True),
    "portable": dict(pos_emb="rope", norm="rmsnorm", activation="swiglu", qk_norm=True,
                     qk_norm_order="before_rope", qk_norm_weight=True, tie_embeddings=True,
                     bias=False),
    "stablelm": dict(pos_emb="rope", norm="layernorm", activation="swiglu", qk_norm=True,
                     qk_norm_order="before_rope", qk_norm_weight=True, tie_embeddings=True,
                     bias=False),
}
# SwiGLU's hidden width is a multiple of this: q8_0's block (GGUF), so every row quantises
SWIGLU_MULTIPLE = 32
# What a config.json that lacks a switch was built with: runs written before qk_norm_order existed
# normalised queries and keys after the rotary rotation, whatever their arch says today.
OLD_RUN_SWITCHES: dict[str, Any] = {"qk_norm_order": "after_rope"}
DOC_MODES = ("lines", "blank", "files")  # one document per line / blank-line block / file
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "muon")
BACKENDS = ("torch", "reference")
LOG_BACKENDS = ("jsonl", "tensorboard", "wandb", "csv")  # jsonl (metrics.jsonl) is always on
# Keys renamed since 0.1.0, old -> new: config.json, TOML files and keyword arguments that use an
# old name keep working.
RENAMED_KEYS = {"engine": "backend"}
# The projections of a block a LoRA adapter can sit on, by their module names in a block (GPT-2's)
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LAYOUT_CHOICES = {
    "pos_emb": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("gelu_tanh", "gelu", "relu2", "swiglu"),
    "qk_norm_order": ("after_rope", "before_rope"),
}


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, **extra: Any) -> Any:
    """A config field with the metadata the CLI builds its flag from (help text, choices)."""
    return field(default=default, metadata={"help": help, "choices": choices, **extra})


def check_choices(settings: Any) -> None:
    """Each field of a settings dataclass that declares `choices` holds one of them (each item,
    for a `multiple` field; None where None is the field's default, "not set")."""
    for f in fields(settings):
        choices = f.metadata.get("choices")
        if not choices:
            continue
        value = getattr(settings, f.name)
        for item in value if f.metadata.get("multiple") else (value,):
            if item not in choices and not (item is None and f.default is None):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of "
                                  f"{', '.join(choices)}; got {item!r}")


@dataclass
class ModelConfig:
    """Architecture. Everything needed to rebuild the network from config.json alone.

    The layout switches default to None = "as `arch` says"; after construction they hold concrete
    values, so config.json records exactly what was built. A config.json written before the
    switches existed has none of them and rebuilds the GPT-2 layout it was trained with; one
    written before qk_norm_order existed rebuilds QK-norm after rotary (model_config_from_dict).
    """

    vocab_size: int = option(67, "vocabulary size (set from the data's tokenizer)", cli=False)
    block_size: int = option(64, "context length in tokens")
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads per block")
    n_embd: int = option(128, "embedding width (divisible by n-head)")
    dropout: float = option(0.0, "dropout probability while training")
    arch: str = option("gpt2", "layout preset: the switches below default to it", tuple(ARCHS))
    bias: bool | None = option(None, "biases in Linear and LayerNorm layers")
    pos_emb: str | None = option(None, "positions: learned (a wpe table) or rope (rotary, no "
                                 "parameters)", LAYOUT_CHOICES["pos_emb"])
    norm: str | None = option(None, "normalisation layer", LAYOUT_CHOICES["norm"])
    activation: str | None = option(None, "MLP activation: gelu_tanh (GPT-2), gelu (exact), relu2 "
                                    "(ReLU squared), swiglu (gated: silu(gate) * up, ~8/3 n-embd "
                                    "wide)", LAYOUT_CHOICES["activation"])
    qk_norm: bool | None = option(None, "normalise queries and keys per head with the model's norm")
    qk_norm_weight: bool | None = option(None, "QK-norm with a learnt gain per head dimension for "
                                         "queries and one for keys, at the layers' epsilon "
                                         "(Qwen3's q_norm / k_norm); without: no weights")
    qk_norm_order: str | None = option(None, "where QK-norm sits: after_rope (normalise rotated "
                                       "queries and keys) or before_rope (normalise, then rotate: "
                                       "Persimmon's order, exportable)",
                                       LAYOUT_CHOICES["qk_norm_order"])
    tie_embeddings: bool | None = option(None, "the LM head reuses the token embedding matrix")
    # LoRA (model.py, lora.py): rank 0 = none. With a rank, the weights above are a frozen base and
    # each target projection W x becomes W x + (alpha / rank) B A x, A (rank, in), B (out, rank).
    lora_rank: int = option(0, "train low-rank adapters of this rank on a frozen --init-from "
                            "model instead of every weight (0 = off; docs/finetune.md)")
    lora_alpha: float = option(16.0, "LoRA scale numerator: adapters add (alpha / rank) B A x")
    lora_targets: tuple[str, ...] = option(LORA_TARGETS, "projections that get adapters, "
                                           "comma-separated or repeated", LORA_TARGETS,
                                           multiple=True)

    def __post_init__(self) -> None:
        for name, value in ARCHS.get(self.arch, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.lora_targets = tuple(dict.fromkeys(split_names(self.lora_targets)))

    def validate(self) -> None:
        check_choices(self)  # arch first: an unknown one leaves its switches None
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
        if self.lora_rank < 0:
            raise ConfigError(f"lora-rank must be >= 0 (0 = off), got {self.lora_rank}")
        if self.lora_rank:
            if not self.lora_targets:
                raise ConfigError("lora-targets must name at least one of "
                                  f"{', '.join(LORA_TARGETS)}")
            if not self.lora_alpha > 0:
                raise ConfigError(f"lora-alpha must be > 0, got {self.lora_alpha}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: 4 n_embd, or for SwiGLU's three matrices about the same
        parameters (8/3 n_embd), rounded up to a multiple of SWIGLU_MULTIPLE."""
        if self.activation != "swiglu":
            return 4 * self.n_embd
        return -(-8 * self.n_embd // (3 * SWIGLU_MULTIPLE)) * SWIGLU_MULTIPLE


@dataclass
class TrainConfig:
    """Everything about a training run that is not the architecture.

    The dataclass defaults are nanoGPT's CPU recipe for Tiny Shakespeare; the presets (below) layer
    the project's own recipe on top.
    """

    data: str | None = option(None, "text file, directory, or prepared data dir (default: the "
                              "bundled Tiny Shakespeare)", cli=False)
    out: str = option("runs/default", "run directory", cli=False)
    docs: str | None = option(None, "document mode: one document per line / blank-line block / "
                              "file (default: one continuous stream)", DOC_MODES)
    val_fraction: float = option(0.1, "share of the text (or of the documents) held out for "
                                 "validation")
    text_field: str = option("text", "JSON field / Parquet column that holds the text (.jsonl, "
                             ".json, .parquet inputs)")
    skip_bad_records: bool = option(False, "skip malformed JSON lines and records without text, "
                                    "counting them, instead of stopping at the first")
    chat: bool = option(False, "train on conversations: JSON-lines records with OpenAI `messages`, "
                        "rendered with the chat template, loss on the assistant's replies only "
                        "(docs/chat-finetune.md)")
    chat_template: str | None = option(None, "JSON chat template to render conversations with "
                                       "(--chat); stored in the run for `serve`", metavar="FILE",
                                       shown="the --init-from run's, else 'System:/User:/"
                                       "Assistant:' lines")
    tokenizer: str = option("char", "tokenizer to build from the text", cli=False)
    tokenizer_vocab_size: int | None = option(None, "bpe vocabulary size (default 1024)", cli=False)
    max_iters: int = option(2000, "optimizer steps to train")
    batch_size: int = option(12, "sequences per micro-batch per device; effective batch = "
                             "batch-size x grad-accum x processes")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    optimizer: str = option("adamw", "adamw, or muon (Muon on hidden matrices, AdamW on the rest)",
                            OPTIMIZERS)
    lr: float = option(1e-3, "AdamW's peak learning rate")
    muon_lr: float = option(0.02, "Muon's peak learning rate (optimizer muon); follows lr's schedule")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "steps of linear warm-up")
    lr_decay_iters: int | None = option(None, "step where the cosine decay reaches min-lr "
                                        "(default: max-iters)")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "global gradient-norm clip (0 = off)")
    eval_interval: int = option(250, "steps between evaluations (each saves a checkpoint)")
    eval_iters: int = option(20, "batches per split at each evaluation")
    patience: int = option(0, "stop early after this many evaluations in a row without a better "
                           "validation loss (0 = never)")
    log_interval: int = option(10, "steps between metrics.jsonl lines")
    log: tuple[str, ...] = option(("jsonl",), "trackers to log to besides metrics.jsonl, "
                                  "comma-separated or repeated", LOG_BACKENDS, multiple=True)
    keep_checkpoints: int = option(2, "newest checkpoints kept on disk (the best is always kept)")
    max_bad_steps: int = option(5, "stop after this many steps in a row with a NaN/inf loss or "
                                "gradient (each is skipped)")
    sample_tokens: int = option(120, "length of the sample printed at each evaluation (0 = none)")
    seed: int = option(1337, "seed of the weights, the batches and the samples")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, then CPU)")
    dtype: str = option("auto", "autocast precision; weights stay float32 (auto: bf16 on GPUs, "
                        "fp32 on CPU)", DTYPE_CHOICES)
    compile: bool = option(False, "torch.compile the model for training")
    threads: int = option(0, "CPU threads (0 = auto: the cores other processes leave idle)")
    backend: str = option("torch", "torch, or reference: the NumPy GPT with a hand-written backward "
                          "(CPU, GPT-2 layout)", BACKENDS)
    init_from: str | None = option(None, "start from existing weights: a minigpt run directory, a "
                                   "Hugging Face GPT-2, GPT-NeoX, Llama, Persimmon or Qwen3 "
                                   "directory, or a Hub name such as gpt2; the model and tokenizer "
                                   "come from it (docs/finetune.md)")
    init_checkpoint: str | None = option(None, "which checkpoint of an --init-from run: best | last "
                                         "| a step number", shown="best")
    # what --init-from resolved to, recorded so a run says which weights it started from
    init_step: int | None = option(None, "step of the --init-from checkpoint", cli=False)
    init_sha256: str | None = option(None, "SHA-256 of the --init-from weights file", cli=False)

    def __post_init__(self) -> None:
        self.log = log_backends(self.log)

    @property
    def documents(self) -> bool:
        """Trained on BOS ... EOS documents (a --docs mode, or conversations): prompts start
        with BOS, as the documents did."""
        return self.docs is not None or self.chat

    def validate(self) -> None:
        check_choices(self)
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
        if not self.text_field:
            raise ConfigError("text-field must not be empty")
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
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = auto), got {self.threads}")
        if self.muon_lr <= 0:
            raise ConfigError(f"muon-lr must be > 0, got {self.muon_lr}")
        if self.patience < 0:
            raise ConfigError(f"patience must be >= 0 (0 = never stop early), got {self.patience}")
        if self.chat_template is not None and not self.chat:
            raise ConfigError("--chat-template renders conversations for --chat; give --chat")
        if self.chat and self.docs is not None:
            raise ConfigError("--chat makes each conversation a document; drop --docs")
        if self.init_checkpoint is not None and self.init_from is None:
            raise ConfigError("--init-checkpoint picks a checkpoint of --init-from RUN; give --init-from")


def split_names(value: Any) -> list[str]:
    """A `multiple` field as given (a string, or a list from repeated flags, TOML or config.json,
    each item possibly comma-separated) -> its names, lower-cased, in order."""
    items = [value] if isinstance(value, str) else list(value or ())
    return [n.strip().lower() for item in items for n in str(item).split(",") if n.strip()]


def log_backends(value: Any) -> tuple[str, ...]:
    """--log as given -> distinct names in order, jsonl first: it is always on."""
    return tuple(dict.fromkeys(["jsonl", *split_names(value)]))


@dataclass(frozen=True)
class Preset:
    description: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


# The training recipe every preset shares (docs/speed.md has the ablation behind each choice):
# StableLM's layout, Muon for hidden matrices, a short warmup.
RECIPE_MODEL: dict[str, Any] = dict(arch="stablelm")
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
# A backend may bring defaults of its own, above the preset and below files and flags: the NumPy
# reference backend implements the GPT-2 layout and AdamW only.
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {"reference": dict(arch="gpt2", optimizer="adamw")}
DEFAULT_PRESET = "small"
# With --init-from, in the spirit of nanoGPT's config/finetune_shakespeare.py: the weights already
# know a lot, so a learning rate well below pre-training's (a tenth of the presets' 3e-3 peak at
# minigpt sizes; GPT-2 itself was pre-trained at 6e-4), a short warmup, a few hundred steps with
# frequent evaluations (the best checkpoint is kept: fine-tuning overfits a small text quickly),
# AdamW throughout and no dropout. Any flag or TOML key still overrides them. The model settings
# come from the source, never from a preset.
FINETUNE_DEFAULTS: dict[str, Any] = dict(optimizer="adamw", lr=3e-4, min_lr=3e-5, warmup_iters=10,
                                         max_iters=200, eval_interval=50, weight_decay=0.1)
# With --lora-rank, above FINETUNE_DEFAULTS: a LoRA update moves the weights by (alpha / r) B A,
# which starts at zero and grows through two small factors, so adapters take ten times full
# fine-tuning's learning rate: of 3e-4, 1e-3 and 3e-3, the last reached the lowest validation loss
# at equal steps (benchmarks/lora.py, docs/finetune.md#lora).
LORA_DEFAULTS: dict[str, Any] = dict(lr=3e-3, min_lr=3e-4)

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
    return renamed({k.replace("-", "_"): v for k, v in raw.items()})


def renamed(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with keys renamed since an earlier version under their current names."""
    out = {RENAMED_KEYS.get(k, k): v for k, v in values.items()}
    both = [f"{old} and {new}" for old, new in RENAMED_KEYS.items() if old in values and new in values]
    if both:
        raise ConfigError(f"give either {both[0]}, not both (the first is the old name)")
    return out


def split_overrides(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat mapping into (model, train) keys; unknown keys are an error."""
    values = renamed(values)
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


@dataclass(frozen=True)
class Given:
    """The settings given explicitly: a TOML file's, under flags/keyword overrides (None = not given).

    `preset` is the one named by the `preset` argument (the --preset flag) or else by the file or
    the overrides; a new run layers these over its preset (`resolve`), a resumed run over its own
    config.json (training/setup.py), a fine-tuning run over FINETUNE_DEFAULTS (`resolve_finetune`).
    """

    preset: str | None
    model: dict[str, Any]
    train: dict[str, Any]


def given_settings(preset: str | None = None, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> Given:
    """TOML file < overrides, split into model and train keys; unknown keys are an error."""
    values: dict[str, Any] = load_toml(config_file) if config_file else {}
    values.update(renamed({k: v for k, v in (overrides or {}).items() if v is not None}))
    named = values.pop("preset", None)
    model, train = split_overrides(values)
    return Given(preset or named, model, train)


def preset_named(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Build (ModelConfig, TrainConfig) from defaults < preset < backend < TOML file < overrides."""
    given = given_settings(preset, config_file, overrides)
    p = preset_named(given.preset or DEFAULT_PRESET)
    backend = given.train.get("backend") or p.train.get("backend") or "torch"
    backend_model, backend_train = split_overrides(BACKEND_DEFAULTS.get(backend, {}))
    mcfg = ModelConfig(**_typed(ModelConfig, {**p.model, **backend_model, **given.model}))
    tcfg = TrainConfig(**_typed(TrainConfig, {**p.train, **backend_train, **given.train}))
    mcfg.validate()
    tcfg.validate()
    return mcfg, tcfg


def resolve_finetune(config_file: str | Path | None = None,
                     overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], TrainConfig]:
    """(the model settings given explicitly, TrainConfig) for a run with --init-from: dataclass
    defaults < FINETUNE_DEFAULTS (< LORA_DEFAULTS with --lora-rank) < TOML file < flags. The model itself comes from the source, so
    the model settings are returned for the caller to check against it, and a preset is refused."""
    given = given_settings(None, config_file, overrides)
    if given.preset:
        raise ConfigError("--init-from takes the model from its source; a preset picks a model "
                          "size: drop --preset")
    if "tokenizer" in given.train or "tokenizer_vocab_size" in given.train:
        raise ConfigError("--init-from brings its model's tokenizer; drop --tokenizer/--vocab-size")
    lora = LORA_DEFAULTS if given.model.get("lora_rank") else {}
    tcfg = TrainConfig(**_typed(TrainConfig, {**FINETUNE_DEFAULTS, **lora, **given.train}))
    tcfg.validate()
    return _typed(ModelConfig, given.model), tcfg


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A model config read back from config.json. A switch the file lacks (a run written before it
    existed) takes the value such runs were built with (OLD_RUN_SWITCHES), not today's arch default."""
    unknown = sorted(set(d) - MODEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown model setting(s): {', '.join(unknown)}")
    d = {**OLD_RUN_SWITCHES, **d}
    cfg = ModelConfig(**_typed(ModelConfig, d))
    cfg.validate()
    return cfg


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    d = renamed(d)
    unknown = sorted(set(d) - TRAIN_KEYS)
    if unknown:
        raise ConfigError(f"unknown train setting(s): {', '.join(unknown)}")
    return TrainConfig(**_typed(TrainConfig, d))


def to_json(mcfg: ModelConfig, tcfg: TrainConfig | None = None) -> str:
    d: dict[str, Any] = {"model": dataclasses.asdict(mcfg)}
    if tcfg is not None:
        d["train"] = dataclasses.asdict(tcfg)
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


# --- sampling ------------------------------------------------------------------------------------


# `SamplingParams` is the one place sampling defaults live: `minigpt sample`, `Engine.generate/stream`,
# the sample printed during training, `minigpt bench generate` and the server all build one, so they
# sample alike out of the box. The default temperature is 0.8 everywhere (the server included, where
# OpenAI's API says 1.0): small char-level models ramble at 1.0, and 0.8 is what nanoGPT samples at.
# It lives here, not in sampling.py, so that building the CLI needs no torch.
@dataclass(frozen=True)
class SamplingParams:
    """How to sample a completion. Built once per request; `validate()` is the only check."""

    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate per sample"})
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy (argmax)"})
    top_k: int | None = field(default=None, metadata={"help": "keep the k most likely tokens (0 = off)"})
    top_p: float | None = field(default=None, metadata={
        "help": "nucleus sampling: keep the most likely tokens up to this probability mass"})
    min_p: float | None = field(default=None, metadata={
        "help": "keep the tokens at least this fraction as likely as the most likely one (0 = off)"})
    seed: int | None = field(default=None, metadata={"help": "the same seed gives the same text"})
    num_samples: int = field(default=1, metadata={"help": "independent samples, decoded in one batch"})
    stop_at_eos: bool = field(default=True, metadata={"help": "end a sample at the end-of-text token"})
    utf8_mask: bool | None = field(default=None, metadata={
        "help": "never sample a token that would make the output invalid UTF-8 "
                "(None: on for bytes/bpe tokenizers, off for char)"})
    # not a CLI flag: the server asks for it (OpenAI's `logprobs`); None = not computed
    logprobs: int | None = field(default=None, metadata={
        "help": "log-probability of each sampled token and of the k most likely", "cli": False})
    # not a flag of its own: `sample --regex/--json-schema/--grammar` and the server's
    # response_format build it (structured.py); None = unconstrained
    constraint: Constraint | None = field(default=None, metadata={
        "help": "the output must match this regex, JSON schema or grammar", "cli": False})

    def validate(self) -> SamplingParams:
        if self.max_new_tokens is None or self.max_new_tokens < 1:
            raise ConfigError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples is None or self.num_samples < 1:
            raise ConfigError(f"num-samples must be >= 1, got {self.num_samples}")
        if self.temperature is None or self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min-p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ConfigError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise ConfigError("constraint must be a minigpt.Constraint, e.g. "
                                  "Constraint.regex('K[a-z]+'), got "
                                  f"{type(self.constraint).__name__}")
            self.constraint.validate()
        return self

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes` (None values mean "keep"), validated."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown sampling setting(s): {', '.join(unknown)}")
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **given).validate()


# --- serving -------------------------------------------------------------------------------------


# `ServeConfig` is the one place the server's settings and their defaults live: `minigpt serve`
# builds its flags from it, `serve.app.serve` and `create_app` take one. Like SamplingParams it
# lives here, so that building the CLI needs no FastAPI.
@dataclass(frozen=True)
class ServeConfig:
    """How a run is served over HTTP. `validate()` is the only check."""

    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)",
                       metavar="ADDRESS")
    port: int = option(8000, "port to listen on (0 = any free port)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/*",
                                 metavar="KEY", shown="env MINIGPT_API_KEY, else no key")
    max_tokens_limit: int = option(1024, "largest max_tokens a request may ask for")
    max_concurrency: int = option(32, "rows in the one decoding batch (a request with n samples "
                                  "takes n)")
    max_queue: int = option(64, "requests waiting for rows; beyond that the server answers 429")
    max_body_bytes: int = option(1 << 20, "largest request body; a larger one is answered 413")
    prompt_cache: int = option(8, "recent prompts and replies whose keys and values a request "
                               "that starts the same way reuses (0 = off; each takes one row of "
                               "the KV cache)")
    threads: int = option(0, "CPU threads the engine process decodes with (0 = auto: the idle "
                          "cores but one, which the HTTP side keeps; OMP_NUM_THREADS if set)")
    compile: bool = option(False, "decode a request that is alone in the batch through a "
                           "torch.compile'd step: faster, after seconds of compiling at start, "
                           "logits equal within float32 rounding (docs/server.md#compiled-decoding)")
    # None: the batcher's own default (serve/app.py: 5 ms), which MINIGPT_STREAM_INTERVAL can set
    stream_interval: float | None = option(
        None, "seconds a stream gathers new text into one chunk (a stream's first text is never "
        "held back)", metavar="SECONDS", shown="env MINIGPT_STREAM_INTERVAL, else 0.005")
    chat_template: str | None = option(
        None, "JSON chat template for /v1/chat/completions (docs/server.md)", metavar="FILE",
        shown="the run's chat_template.json, else 'System:/User:/Assistant:' lines")
    utf8_mask: bool | None = option(None, "never sample a token that would make the output "
                                    "invalid UTF-8", shown="on for bytes/bpe tokenizers, off for "
                                    "char")

    def validate(self) -> ServeConfig:
        check_choices(self)
        if self.api_key == "":
            raise ConfigError("the API key must not be empty")
        for name, lowest in (("max_tokens_limit", 1), ("max_concurrency", 1), ("max_queue", 0),
                             ("max_body_bytes", 1), ("prompt_cache", 0), ("threads", 0)):
            if getattr(self, name) < lowest:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {lowest}, got "
                                  f"{getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        if self.stream_interval is not None and not self.stream_interval >= 0:
            raise ConfigError(f"--stream-interval must be >= 0, got {self.stream_interval}")
        return self
