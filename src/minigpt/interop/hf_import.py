"""A Hugging Face directory (transformers' `save_pretrained`, or a Hub snapshot) read into
minigpt: config.json -> ModelConfig, model.safetensors -> minigpt weights, and tokenizer.json (or
vocab.json + merges.txt) -> a minigpt BPE tokenizer with `<|endoftext|>` as both BOS and EOS (a
minigpt char export comes back as the char tokenizer it was).

GPT-2 is read here; GPT-NeoX, Llama, Persimmon and Qwen3 (the other classes minigpt exports) by
hf_classes.py, which inverts the export maps. Only what minigpt computes exactly is accepted: for
GPT-2, GPT-2 as transformers runs it by default. Anything
else (another architecture, an untied head, GPT-2 variants such as per-layer attention scaling, a
LayerNorm epsilon other than minigpt's) is refused with one line, never approximated. Weights are
read from safetensors only; a directory with a pickled `pytorch_model.bin` alone is refused with a
line saying how to convert it, and the pickle is never opened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_weights
from ..config import ModelConfig
from ..errors import CheckpointError, TokenizerError
from ..fsio import sha256_file
from ..tokenization import BPETokenizer, CharTokenizer
from ..tokenization.base import BOS, EOS
from . import hf_classes
from .gpt2_names import expected_names, is_conv1d, minigpt_name

ENDOFTEXT = "<|endoftext|>"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded safetensors
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# transformers' activation names -> minigpt's; gelu_new and gelu_pytorch_tanh are both the tanh
# approximation GPT-2 was trained with
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which minigpt's LayerNorm uses
# GPT2Config fields that change what the network computes, with the only value minigpt implements
EXACT_ONLY = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
              "add_cross_attention": False, "tie_word_embeddings": True}


def read_config_json(path: Path) -> dict[str, Any] | None:
    """config.json of a directory as a dict, or None when there is none or it is not JSON."""
    try:
        d = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def is_hf_dir(path: Path) -> bool:
    """A transformers model directory: its config.json names a `model_type`."""
    d = read_config_json(path)
    return d is not None and "model_type" in d


SUPPORTED = ("gpt2", *hf_classes.CLASSES)


def model_config(path: Path, hf: dict[str, Any]) -> ModelConfig:
    """The minigpt layout that computes exactly what this config.json does (GPT-2's here)."""
    if hf.get("model_type") in hf_classes.CLASSES:
        return hf_classes.model_config(path, hf)
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{path} holds a {hf.get('model_type')!r} model; --init-from reads "
                              f"GPT-2, GPT-NeoX, Llama, Persimmon, Qwen3 and StableLM directories (config.json "
                              f"model_type {', '.join(SUPPORTED)}) or minigpt runs")
    for key, value in EXACT_ONLY.items():
        if hf.get(key, value) != value:
            raise CheckpointError(f"{path}: GPT-2 with {key}={hf[key]} is not supported (minigpt "
                                  f"computes {key}={value} only)")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{path}: activation_function {act!r} is not supported (choose from "
                              f"{', '.join(ACTIVATIONS)})")
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        raise CheckpointError(f"{path}: layer_norm_epsilon {eps} differs from minigpt's "
                              f"{LAYER_NORM_EPS}; the logits would not be the same")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise CheckpointError(f"{path}: n_inner {hf['n_inner']} is not 4 x n_embd ({4 * n_embd}), "
                              "the only MLP width minigpt builds")
    try:
        cfg = ModelConfig(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                          n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                          dropout=0.0, arch="gpt2", activation=ACTIVATIONS[act])
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json is malformed: {e}") from None
    return cfg


def weights_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a directory; a pickle-only directory is refused, unopened."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / WEIGHTS_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{path / WEIGHTS_INDEX} is malformed") from None
        return [path / s for s in shards]
    if any((path / p).is_file() for p in PICKLES):
        raise CheckpointError(
            f"{path} has only a pickled pytorch_model.bin, which minigpt never loads (unpickling can "
            "run code); convert it to safetensors where you trust it: python -c \"from transformers "
            f"import AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}', "
            "safe_serialization=True)\"")
    raise CheckpointError(f"{path} has no {WEIGHTS}")


def read_state(path: Path, cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], str]:
    """The directory's weights in minigpt's names and layout, and the SHA-256 of the weights file
    (of the index file, for sharded weights: it names the shards)."""
    files = weights_files(path)
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update(read_weights(f))
    digest = sha256_file(path / WEIGHTS_INDEX if len(files) > 1 or not (path / WEIGHTS).is_file()
                         else files[0])
    if cfg.arch != "gpt2":  # a class hf_classes reads (model_config chose the layout)
        return hf_classes.read_state(path, cfg, raw), digest
    state = {}
    for hf_name, tensor in raw.items():
        name = minigpt_name(hf_name)
        if name is None:
            continue
        # Conv1D (in, out) -> nn.Linear (out, in); float32 master weights, as minigpt trains
        state[name] = (tensor.t() if is_conv1d(name) else tensor).float().contiguous()
    wanted = expected_names(cfg.n_layer)
    missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or extra:
        raise CheckpointError(f"{path}: the weights are not those of the GPT-2 config.json describes "
                              f"(missing: {missing[:3]}, unexpected: {extra[:3]})")
    return state, digest


def _char_tokenizer(d: dict[str, Any]) -> CharTokenizer | None:
    """A minigpt char export (interop/hf_tokenizer.py: BPE with no merges, no pre-tokenizer, a
    Fuse decoder, the characters then BOS and EOS) read back as the char tokenizer it came from."""
    model = d.get("model") or {}
    if (model.get("type") != "BPE" or model.get("merges") or d.get("pre_tokenizer") is not None
            or (d.get("decoder") or {}).get("type") != "Fuse"):
        return None
    vocab = model.get("vocab") or {}
    chars = [c for c, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"]: t["id"] for t in d.get("added_tokens", [])}
    if specials != {BOS: len(chars), EOS: len(chars) + 1} or any(len(c) != 1 for c in chars):
        return None
    return CharTokenizer(chars)


def read_tokenizer(path: Path, special_ids: tuple[int | None, int | None] = (None, None)
                   ) -> BPETokenizer | CharTokenizer:
    """GPT-2's byte-level BPE from tokenizer.json, or from vocab.json + merges.txt (built the way
    transformers' GPT2TokenizerFast builds it). BOS and EOS are the tokens config.json's
    bos/eos_token_id name (`special_ids`; a minigpt bpe export has two), else <|endoftext|>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    path = Path(path)
    try:
        if (path / "tokenizer.json").is_file():
            hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            hf = HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
        else:
            raise TokenizerError(f"{path} has no tokenizer: need tokenizer.json, or vocab.json and "
                                 "merges.txt")
    except TokenizerError:
        raise
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
        raise TokenizerError(f"cannot read the tokenizer in {path}: {str(e)[:200]}") from None
    char = _char_tokenizer(json.loads(hf.to_str()))
    if char is not None:
        return char
    bos, eos = (hf.id_to_token(i) if isinstance(i, int) else None for i in special_ids)
    bos, eos = bos or ENDOFTEXT, eos or ENDOFTEXT
    for token in {bos, eos}:
        if hf.token_to_id(token) is None:
            raise TokenizerError(f"the tokenizer in {path} has no {token} token")
    hf.add_special_tokens(sorted({bos, eos}))  # already in the vocabulary: marks them special, same ids
    return BPETokenizer(hf, json.loads(hf.to_str()), bos=bos, eos=eos)


def load_hf_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], BPETokenizer | CharTokenizer,
                                    str]:
    """(model config, minigpt weights, tokenizer, weights SHA-256) of a directory."""
    hf = read_config_json(path) or {}
    cfg = model_config(path, hf)
    # the tokenizer before the weights: a cheap refusal should not wait for a big read
    tok = read_tokenizer(path, (hf.get("bos_token_id"), hf.get("eos_token_id")))
    if tok.vocab_size != cfg.vocab_size:
        raise TokenizerError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's "
                             f"vocabulary is {cfg.vocab_size}; they must be the same")
    state, digest = read_state(path, cfg)
    return cfg, state, tok, digest
