"""GPT-NeoX, Llama, Persimmon, Qwen3 and StableLM directories read into minigpt: the inverse of hf_model's
export maps, derived from them rather than written a second time.

config.json -> ModelConfig is read per class (below), then checked by exporting that ModelConfig's
config again (hf_model) and comparing every field both have that changes what the network
computes: a stock checkpoint that differs anywhere minigpt cannot follow (partial rotary, parallel
residuals, grouped KV heads, another rope base or eps, an MLP width minigpt does not build) is
refused with one line naming the field, never approximated.

The weights: hf_model's map from minigpt's state to the class's tensors only moves values
(transposes, per-head reorders, splits) or writes constants (zero biases where a layout has none,
the weight-1 QK-norms, Llama's up_proj fixed at 1). Running it on a probe state whose every element
holds its own index (from 2: 0 and 1 are the constants) says where each minigpt value sits in the
directory's tensors, and which of those must hold a constant; a tensor the file lacks is accepted
only where the map writes zeros (a bias the class leaves out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import ROPE_BASE
from . import hf_model

# model_type -> the export's Architecture; gpt2 is hf_import's own (GPT-2's Conv1D names)
CLASSES = {a.model_type: a for a in (hf_model.GPT_NEOX, hf_model.LLAMA, hf_model.PERSIMMON,
                                     hf_model.QWEN3, hf_model.STABLELM)}
GATED = ("llama", "qwen3", "stablelm")  # the classes whose MLP is gated: silu there is SwiGLU
ACTIVATIONS = {v: k for k, v in hf_model.ACTIVATIONS.items() if k != "swiglu"}
# config.json fields that do not change the function computed (or are read separately)
NOT_COMPUTED = {"architectures", "torch_dtype", "dtype", "use_cache", "initializer_range",
                "bos_token_id", "eos_token_id", "pad_token_id", "transformers_version",
                "attention_dropout", "hidden_dropout", "max_window_layers", "sliding_window",
                "rope_parameters", "rope_scaling", "rope_theta", "rotary_emb_base",
                "partial_rotary_factor", "rotary_pct", "max_position_embeddings", "pretraining_tp",
                "mlp_bias"}  # (the rope fields: _rope; mlp_bias: the weights' own check)
# buffers some checkpoints carry beside the weights: derived, not learnt
BUFFERS = (".rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")
OFFSET = 2.0  # probe values start here: 0 and 1 are the constants the export maps write


def _refuse(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; --init-from reads only what minigpt computes exactly")


def _rope(path: Path, hf: dict[str, Any]) -> None:
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", ROPE_BASE)))
    partial = params.get("partial_rotary_factor",
                         hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    kind = params.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type", "default"))
    if (float(theta), float(partial), kind) != (ROPE_BASE, 1.0, "default"):
        raise _refuse(path, f"rotary base {theta}, over {partial} of each head, {kind} scaling "
                            f"(minigpt: base {ROPE_BASE:g}, the whole head, default)")


def model_config(path: Path, hf: dict[str, Any]) -> ModelConfig:
    """The minigpt layout that computes exactly what this config.json describes."""
    kind = hf["model_type"]
    _rope(path, hf)
    act = hf.get("hidden_act", "silu" if kind in GATED else "gelu")
    gated = kind in GATED and act == "silu"
    if not gated and act not in ACTIVATIONS:
        raise _refuse(path, f"hidden_act {act!r} (minigpt: {', '.join(ACTIVATIONS)}"
                            f"{', or silu in a gated MLP' if kind in GATED else ''})")
    switches: dict[str, Any] = dict(pos_emb="rope", activation="swiglu" if gated else ACTIVATIONS[act],
                                    tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    if kind == "gpt_neox":
        switches.update(arch="modern", norm="layernorm", qk_norm=False, bias=True)
    elif kind == "persimmon":
        switches.update(arch="modern", norm="layernorm", qk_norm=True, qk_norm_order="before_rope",
                        bias=True, qk_norm_weight=True)
    elif kind == "llama":
        switches.update(arch="modern", norm="rmsnorm", qk_norm=False,
                        bias=bool(hf.get("attention_bias", False)))
    elif kind == "stablelm":
        # biases in q/k/v (use_qkv_bias) are refused by the field check below
        switches.update(arch="stablelm", qk_norm=bool(hf.get("qk_layernorm", False)))
    else:
        switches.update(arch="portable", bias=bool(hf.get("attention_bias", False)))
    try:
        cfg = ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                          n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                          n_embd=hf["hidden_size"], dropout=0.0, **switches)
        cfg.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json is malformed or lacks a field: {e}") from None
    if hf_model.refusal(cfg):
        raise _refuse(path, hf_model.refusal(cfg)[0])
    ours = hf_model.architecture(cfg).config(cfg)
    # a field config.json leaves out takes transformers' default, which is what minigpt builds
    for key in sorted(set(ours) & set(hf) - NOT_COMPUTED):
        if hf[key] != ours[key]:
            raise _refuse(path, f"{key} {hf[key]!r} (minigpt builds {ours[key]!r} for this layout)")
    return cfg


def read_state(path: Path, cfg: ModelConfig, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The directory's tensors `raw` in minigpt's names and layout, through the export map's
    probe (module docstring)."""
    from ..model import GPT

    shapes = {k: v.shape for k, v in GPT(cfg).state_dict().items()
              if not (cfg.tie_embeddings and k == "lm_head.weight")}
    probe, start = {}, 0
    for name, shape in shapes.items():
        n = shape.numel()
        probe[name] = (torch.arange(n, dtype=torch.float64) + start + OFFSET).view(shape)
        start += n
    flat = torch.full((start,), float("nan"), dtype=torch.float64)
    mapped = hf_model.architecture(cfg).weights(cfg, probe)
    arch = hf_model.architecture(cfg).name
    used = set()
    for hf_name, where in mapped.items():
        key = hf_name if hf_name in raw else None
        if key is None and hf_name == "embed_out.weight" and "lm_head.weight" in raw:
            key = "lm_head.weight"  # GPT-NeoX's head as transformers 5 saves it
        where = where.reshape(-1).to(torch.float64)
        if key is None:
            if (where == 0).all():
                continue  # a bias the class leaves out: zeros, as minigpt's layout has none
            raise _refuse(path, f"the weights lack {hf_name}, which {arch} has")
        values = raw[key].reshape(-1).to(torch.float64)
        if values.numel() != where.numel():
            raise _refuse(path, f"{key} has {values.numel()} values, {arch} of this config needs "
                                f"{where.numel()}")
        fixed = where < OFFSET
        if not torch.equal(values[fixed], where[fixed]):
            raise _refuse(path, f"{key} is not the constant minigpt's layout fixes there (a bias or "
                                "norm weight it does not have)")
        index, found = (where[~fixed] - OFFSET).long(), values[~fixed]
        known = ~flat[index].isnan()  # read before, from another tensor
        shared = torch.equal(flat[index][known], found[known])
        flat[index] = found
        if not (shared and torch.equal(flat[index], found)):  # one minigpt value in several places
            raise _refuse(path, f"{key} holds different values where minigpt shares one (e.g. "
                                "per-head norm weights that differ between heads)")
        used.add(key)
    extra = sorted(k for k in set(raw) - used if not k.endswith(BUFFERS))
    if extra:
        raise _refuse(path, f"the weights hold tensors {arch} of this config has not ({extra[:3]})")
    if flat.isnan().any():
        raise _refuse(path, f"the weights do not cover every {arch} tensor")
    out, start = {}, 0
    for name, shape in shapes.items():
        n = shape.numel()
        out[name] = flat[start:start + n].view(shape).float().contiguous()
        start += n
    return out
