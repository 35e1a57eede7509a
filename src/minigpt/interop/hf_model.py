"""minigpt layouts as stock transformers architectures: which one, its config.json, its weights.

Five stock classes between them compute, exactly, every layout but those refused below;
tests/test_export_hf.py checks the logits through transformers' own loader:

    --pos-emb learned, LayerNorm, no QK-norm  -> GPT2LMHeadModel       (--arch gpt2)
    --pos-emb rope,    LayerNorm, no QK-norm  -> GPTNeoXForCausalLM    (--arch modern --no-qk-norm)
    --pos-emb rope,    RMSNorm,   no QK-norm  -> LlamaForCausalLM
    --pos-emb rope,    LayerNorm, QK-norm before rotary -> PersimmonForCausalLM
                                                (--arch modern --qk-norm-order before_rope)
    --pos-emb rope,    RMSNorm, QK-norm with gains before rotary, SwiGLU, no biases
                                              -> Qwen3ForCausalLM      (--arch portable)

Every switch maps onto a config field or onto the weights: an activation is a config name; biases
turned off are zero biases; an untied head is a separate lm_head tensor. GPT-2 stores linear
layers as Conv1D, (in, out), so matrices are transposed. GPT-NeoX and Persimmon fuse q, k and v per
head (head 0's q, k, v rows, then head 1's...) where minigpt's c_attn stacks all queries, then all
keys, then all values. Llama's MLP is gated, down(act(gate(x)) * up(x)): a SwiGLU c_fc (gate rows,
then up rows) splits into gate_proj and up_proj with act silu; any other activation's c_fc becomes
gate_proj and up_proj is zero weights with bias 1, so the gate's factor is exactly 1 (the export
carries that extra matrix). The non-gated classes (GPT-2, GPT-NeoX, Persimmon) refuse SwiGLU.

Qwen3's q_norm / k_norm are RMS norms of each head's queries and keys before the rotation, with a
weight of head_dim and the layers' rms_norm_eps: minigpt's QK-norm under --norm rmsnorm
--qk-norm-weight --qk-norm-order before_rope, exactly. Its MLP is SwiGLU without biases, its
attention's biases are one switch (attention_bias), so it takes --no-bias only. minigpt's rotary embedding already uses the rotate-half convention these
models use, with the same base (10000), so queries and keys need no permutation.

Persimmon's per-head q_layernorm / k_layernorm is a LayerNorm of each head's queries and keys before
the rotary rotation, with the model's layer_norm_eps (1e-5: the eps of minigpt's parameter-free
F.layer_norm too); exported with weight 1 and bias 0 it is minigpt's QK-norm under
--qk-norm-order before_rope. Its scaling is head_dim ** -0.5, as scaled_dot_product_attention's.

Refused, with the switch named: QK-norm after the rotation (--qk-norm-order after_rope, the order of
every run made before the switch existed): the stock models with a per-head QK LayerNorm
(Persimmon, StableLM, Cohere) apply it before the rotation, and a LayerNorm, which subtracts the
mean, does not commute with one. QK-norm under --norm rmsnorm, in either order: an RMS norm does
commute with the rotation, but Qwen3's and NanoChat's per-head RMS norms share the layer norms'
epsilon (minigpt's weightless one uses float32's, ~1.2e-7, beside its RMSNorm layers' 1e-6; with
--qk-norm-weight it uses theirs and exports as Qwen3). QK-norm with learned positions, and learned
positions with RMSNorm: no stock class has either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig
from ..model import ROPE_BASE

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which make_norm keeps
RMS_NORM_EPS = 1e-6  # make_norm's RMSNorm
# gelu_pytorch_tanh is GPT-2's gelu_new computed by torch's own tanh-GELU kernel: minigpt's, bit for bit
ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu2": "relu2", "swiglu": "silu"}
PORTABLE = "--arch portable (Qwen3's layout)"
STABLELM_FLAG = "--arch stablelm (StableLM's layout)"

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Architecture:
    name: str  # the transformers class, config.json's "architectures"
    model_type: str
    summary: str  # for the model card: how minigpt's layout becomes this class
    config: Callable[[ModelConfig], dict[str, Any]]
    weights: Callable[[ModelConfig, Weights], Weights]


def refusal(cfg: ModelConfig) -> tuple[str, str] | None:
    """(why no stock architecture computes this layout, what to train instead), or None."""
    if cfg.qk_norm:
        if cfg.pos_emb == "learned":
            return ("no transformers architecture with learned position embeddings normalises queries "
                    "and keys", "train with --no-qk-norm, or with --pos-emb rope --qk-norm-order "
                    "before_rope")
        if cfg.norm == "rmsnorm":
            return _qwen3_refusal(cfg)
        if cfg.qk_norm_order == "after_rope":
            return ("minigpt's --qk-norm-order after_rope is a LayerNorm of each head's queries and keys "
                    "after the rotary rotation, and no transformers architecture computes that "
                    "(Persimmon, StableLM and Cohere normalise before the rotation, which a LayerNorm "
                    "does not commute with)",
                    "train with --qk-norm-order before_rope (exported as Persimmon), or with --no-qk-norm")
        if cfg.activation == "swiglu":
            return _stablelm_refusal(cfg)
        return None
    if cfg.pos_emb == "learned" and cfg.norm == "rmsnorm":
        return ("GPT-2, the transformers architecture with learned position embeddings, has no RMSNorm "
                "(--norm rmsnorm)", "train with --norm layernorm, or with --pos-emb rope")
    if cfg.activation == "swiglu" and cfg.norm == "layernorm":
        return _stablelm_refusal(cfg)
    return None


def _stablelm_refusal(cfg: ModelConfig) -> tuple[str, str] | None:
    """Why a LayerNorm layout with a SwiGLU MLP is not StableLM's, or None when it is."""
    if cfg.pos_emb == "learned":
        return ("GPT-2, the transformers architecture with LayerNorm and learned position embeddings, "
                "has no gated MLP (--activation swiglu)", f"train with {STABLELM_FLAG}, or with "
                "another --activation")
    if cfg.bias:
        return ("StableLM, the transformers architecture with LayerNorm and a gated MLP (--activation "
                "swiglu), has no biases in its projections (this run: bias True)",
                f"train with {STABLELM_FLAG}, or with another --activation")
    return None


def _qwen3_refusal(cfg: ModelConfig) -> tuple[str, str] | None:
    """Why a layout with an RMS QK-norm is not Qwen3's, or None when it is."""
    if not cfg.qk_norm_weight:
        return ("minigpt's --qk-norm is an RMS norm of each head's queries and keys with float32's "
                "epsilon, and no transformers architecture computes that exactly (Qwen3's and "
                "NanoChat's share their layer norms' epsilon)",
                f"train with {PORTABLE}, with --norm layernorm --qk-norm-order before_rope "
                "(Persimmon), or with --no-qk-norm")
    if cfg.qk_norm_order == "after_rope":
        return ("Qwen3 applies its QK-norm gains before the rotary rotation, which a per-dimension gain "
                "does not commute with (--qk-norm-order after_rope)",
                f"train with --qk-norm-order before_rope ({PORTABLE})")
    if cfg.activation != "swiglu" or cfg.bias:
        return ("Qwen3, the transformers architecture with a per-head RMS QK-norm, has a SwiGLU MLP "
                f"without biases (this run: --activation {cfg.activation}, bias {cfg.bias})",
                f"train with {PORTABLE}")
    return None


def architecture(cfg: ModelConfig) -> Architecture:
    """The stock architecture for a layout `refusal` accepts."""
    if cfg.norm == "layernorm" and cfg.activation == "swiglu":
        return STABLELM
    if cfg.qk_norm:
        return QWEN3 if cfg.norm == "rmsnorm" else PERSIMMON
    if cfg.pos_emb == "learned":
        return GPT2
    return GPT_NEOX if cfg.norm == "layernorm" else LLAMA


# --- config.json ---------------------------------------------------------------------------------


def _common(cfg: ModelConfig, arch: str, model_type: str) -> dict[str, Any]:
    return {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", "use_cache": True}


def _rope(cfg: ModelConfig) -> dict[str, Any]:
    # rope_parameters is how transformers 5 reads it; rope_theta/rotary_emb_base how 4.x does
    return {"rope_parameters": {"rope_type": "default", "rope_theta": ROPE_BASE,
                                "partial_rotary_factor": 1.0},
            "rope_theta": ROPE_BASE, "max_position_embeddings": cfg.block_size}


def gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**_common(cfg, "GPT2LMHeadModel", "gpt2"), "n_positions": cfg.block_size,
            "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden,
            "activation_function": ACTIVATIONS[cfg.activation],
            "layer_norm_epsilon": LAYER_NORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "initializer_range": 0.02}


def gpt_neox_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**_common(cfg, "GPTNeoXForCausalLM", "gpt_neox"), **_rope(cfg),
            "rotary_pct": 1.0, "rotary_emb_base": ROPE_BASE,
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "intermediate_size": cfg.mlp_hidden,
            "hidden_act": ACTIVATIONS[cfg.activation], "layer_norm_eps": LAYER_NORM_EPS,
            "use_parallel_residual": False,  # minigpt's blocks are sequential: x + attn, then + mlp
            "attention_bias": True, "attention_dropout": 0.0, "hidden_dropout": 0.0,
            "initializer_range": 0.02}


def llama_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**_common(cfg, "LlamaForCausalLM", "llama"), **_rope(cfg),
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
            "head_dim": cfg.head_dim, "intermediate_size": cfg.mlp_hidden,
            "hidden_act": ACTIVATIONS[cfg.activation], "rms_norm_eps": RMS_NORM_EPS,
            "attention_bias": cfg.bias, "mlp_bias": True,  # up_proj's bias carries the 1
            "attention_dropout": 0.0, "pretraining_tp": 1, "initializer_range": 0.02}


def qwen3_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**_common(cfg, "Qwen3ForCausalLM", "qwen3"), **_rope(cfg),
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
            "head_dim": cfg.head_dim, "intermediate_size": cfg.mlp_hidden, "hidden_act": "silu",
            "rms_norm_eps": RMS_NORM_EPS,  # the layers' and q_norm/k_norm's: minigpt's, both
            "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.n_layer, "attention_dropout": 0.0, "initializer_range": 0.02}


def persimmon_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**_common(cfg, "PersimmonForCausalLM", "persimmon"), **_rope(cfg),
            "partial_rotary_factor": 1.0,  # where transformers 4.x reads it
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "intermediate_size": cfg.mlp_hidden,
            "hidden_act": ACTIVATIONS[cfg.activation], "layer_norm_eps": LAYER_NORM_EPS,
            "qk_layernorm": True,  # with eps layer_norm_eps: minigpt's QK LayerNorm's (F.layer_norm)
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02}


def stablelm_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**_common(cfg, "StableLmForCausalLM", "stablelm"), **_rope(cfg),
            "partial_rotary_factor": 1.0,  # where transformers 4.x reads it
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
            "intermediate_size": cfg.mlp_hidden, "hidden_act": "silu",
            "layer_norm_eps": LAYER_NORM_EPS,  # the layers' and the per-head q/k norms': minigpt's
            "qk_layernorm": bool(cfg.qk_norm), "use_qkv_bias": False,
            "use_parallel_residual": False,  # minigpt's blocks are sequential
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02}


# --- weights -------------------------------------------------------------------------------------


def _bias(sd: Weights, name: str, size: int) -> torch.Tensor:
    """A minigpt bias, or zeros where the layout has none: a zero bias adds nothing."""
    return sd[name] if name in sd else torch.zeros(size)


def _head(cfg: ModelConfig, sd: Weights, name: str) -> Weights:
    return {} if cfg.tie_embeddings else {name: sd["lm_head.weight"]}


def gpt2_weights(cfg: ModelConfig, sd: Weights) -> Weights:
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}
    names = [f"h.{i}.{m}" for i in range(cfg.n_layer) for m in ("ln_1", "ln_2")] + ["ln_f"]
    for m in names:
        out[f"transformer.{m}.weight"] = sd[f"{m}.weight"]
        out[f"transformer.{m}.bias"] = _bias(sd, f"{m}.bias", cfg.n_embd)
    for i in range(cfg.n_layer):
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = sd[f"h.{i}.{m}.weight"]  # nn.Linear (out, in) -> Conv1D (in, out)
            out[f"transformer.h.{i}.{m}.weight"] = w.t()
            out[f"transformer.h.{i}.{m}.bias"] = _bias(sd, f"h.{i}.{m}.bias", w.size(0))
    return {**out, **_head(cfg, sd, "lm_head.weight")}


def _per_head_qkv(cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    """(3C, ...) rows [q | k | v], each head-major, -> rows [head 0: q k v | head 1: q k v | ...]."""
    H, D = cfg.n_head, cfg.head_dim
    return t.reshape(3, H, D, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def gpt_neox_weights(cfg: ModelConfig, sd: Weights) -> Weights:
    C, p = cfg.n_embd, "gpt_neox.layers"
    out = {"gpt_neox.embed_in.weight": sd["wte.weight"],
           "gpt_neox.final_layer_norm.weight": sd["ln_f.weight"],
           "gpt_neox.final_layer_norm.bias": _bias(sd, "ln_f.bias", C)}
    for i in range(cfg.n_layer):
        h = f"h.{i}"
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm"),
                             ("attn.c_proj", "attention.dense"), ("mlp.c_fc", "mlp.dense_h_to_4h"),
                             ("mlp.c_proj", "mlp.dense_4h_to_h")):
            w = sd[f"{h}.{ours}.weight"]
            out[f"{p}.{i}.{theirs}.weight"] = w
            out[f"{p}.{i}.{theirs}.bias"] = _bias(sd, f"{h}.{ours}.bias", w.size(0))
        qkv = f"{p}.{i}.attention.query_key_value"
        out[f"{qkv}.weight"] = _per_head_qkv(cfg, sd[f"{h}.attn.c_attn.weight"])
        out[f"{qkv}.bias"] = _per_head_qkv(cfg, _bias(sd, f"{h}.attn.c_attn.bias", 3 * C))
    # embed_out is the name transformers 4.x loads; 5.x renames it to lm_head as it loads
    return {**out, **_head(cfg, sd, "embed_out.weight")}


def llama_weights(cfg: ModelConfig, sd: Weights, qk_norms: bool = False) -> Weights:
    """Llama's names; with `qk_norms`, Qwen3's (Llama's plus per-head q/k norms, no biases)."""
    C, p = cfg.n_embd, "model.layers"
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    for i in range(cfg.n_layer):
        h = f"h.{i}"
        out[f"{p}.{i}.input_layernorm.weight"] = sd[f"{h}.ln_1.weight"]
        out[f"{p}.{i}.post_attention_layernorm.weight"] = sd[f"{h}.ln_2.weight"]
        qkv = sd[f"{h}.attn.c_attn.weight"].split(C)
        for name, w in zip(("q_proj", "k_proj", "v_proj"), qkv):
            out[f"{p}.{i}.self_attn.{name}.weight"] = w
        out[f"{p}.{i}.self_attn.o_proj.weight"] = sd[f"{h}.attn.c_proj.weight"]
        if cfg.bias:
            for name, b in zip(("q_proj", "k_proj", "v_proj"), sd[f"{h}.attn.c_attn.bias"].split(C)):
                out[f"{p}.{i}.self_attn.{name}.bias"] = b
            out[f"{p}.{i}.self_attn.o_proj.bias"] = sd[f"{h}.attn.c_proj.bias"]
        if qk_norms:
            out[f"{p}.{i}.self_attn.q_norm.weight"] = sd[f"{h}.attn.ln_q.weight"]
            out[f"{p}.{i}.self_attn.k_norm.weight"] = sd[f"{h}.attn.ln_k.weight"]
        out.update(_gated_mlp(cfg, sd, h, f"{p}.{i}.mlp", biases=not qk_norms))
    return {**out, **_head(cfg, sd, "lm_head.weight")}


def _gated_mlp(cfg: ModelConfig, sd: Weights, h: str, to: str, biases: bool) -> Weights:
    """minigpt's MLP as down(act(gate(x)) * up(x)): SwiGLU's c_fc split into its gate and up rows;
    any other activation's c_fc as the gate, with up fixed at 1 (zero weights, bias 1)."""
    C, H = cfg.n_embd, cfg.mlp_hidden
    if cfg.activation == "swiglu":
        gate, up = sd[f"{h}.mlp.c_fc.weight"].split(H)
        out = {f"{to}.gate_proj.weight": gate, f"{to}.up_proj.weight": up}
        if biases:
            gate_b, up_b = _bias(sd, f"{h}.mlp.c_fc.bias", 2 * H).split(H)
            out.update({f"{to}.gate_proj.bias": gate_b, f"{to}.up_proj.bias": up_b})
    else:
        out = {f"{to}.gate_proj.weight": sd[f"{h}.mlp.c_fc.weight"],
               f"{to}.gate_proj.bias": _bias(sd, f"{h}.mlp.c_fc.bias", H),
               f"{to}.up_proj.weight": torch.zeros(H, C), f"{to}.up_proj.bias": torch.ones(H)}
    out[f"{to}.down_proj.weight"] = sd[f"{h}.mlp.c_proj.weight"]
    if biases:
        out[f"{to}.down_proj.bias"] = _bias(sd, f"{h}.mlp.c_proj.bias", C)
    return out


def qwen3_weights(cfg: ModelConfig, sd: Weights) -> Weights:
    return llama_weights(cfg, sd, qk_norms=True)


def persimmon_weights(cfg: ModelConfig, sd: Weights) -> Weights:
    C, D, p = cfg.n_embd, cfg.head_dim, "model.layers"
    out = {"model.embed_tokens.weight": sd["wte.weight"],
           "model.final_layernorm.weight": sd["ln_f.weight"],
           "model.final_layernorm.bias": _bias(sd, "ln_f.bias", C)}
    for i in range(cfg.n_layer):
        h = f"h.{i}"
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm"),
                             ("attn.c_proj", "self_attn.dense"), ("mlp.c_fc", "mlp.dense_h_to_4h"),
                             ("mlp.c_proj", "mlp.dense_4h_to_h")):
            w = sd[f"{h}.{ours}.weight"]
            out[f"{p}.{i}.{theirs}.weight"] = w
            out[f"{p}.{i}.{theirs}.bias"] = _bias(sd, f"{h}.{ours}.bias", w.size(0))
        qkv = f"{p}.{i}.self_attn.query_key_value"
        out[f"{qkv}.weight"] = _per_head_qkv(cfg, sd[f"{h}.attn.c_attn.weight"])
        out[f"{qkv}.bias"] = _per_head_qkv(cfg, _bias(sd, f"{h}.attn.c_attn.bias", 3 * C))
        for norm, ours in (("q_layernorm", "ln_q"), ("k_layernorm", "ln_k")):
            # minigpt's gains under --qk-norm-weight; without them, weight 1
            out[f"{p}.{i}.self_attn.{norm}.weight"] = sd.get(f"{h}.attn.{ours}.weight", torch.ones(D))
            out[f"{p}.{i}.self_attn.{norm}.bias"] = torch.zeros(D)
    return {**out, **_head(cfg, sd, "lm_head.weight")}


def stablelm_weights(cfg: ModelConfig, sd: Weights) -> Weights:
    """StableLM's names: Llama's projections and gated MLP, LayerNorms with biases (zeros: the
    layout has none), and per-head q/k LayerNorms, one module per head, each given the gains the
    heads share (or weight 1 without --qk-norm-weight)."""
    C, D, p = cfg.n_embd, cfg.head_dim, "model.layers"
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"],
           "model.norm.bias": _bias(sd, "ln_f.bias", C)}
    for i in range(cfg.n_layer):
        h, a = f"h.{i}", f"{p}.{i}.self_attn"
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[f"{p}.{i}.{theirs}.weight"] = sd[f"{h}.{ours}.weight"]
            out[f"{p}.{i}.{theirs}.bias"] = _bias(sd, f"{h}.{ours}.bias", C)
        for name, w in zip(("q_proj", "k_proj", "v_proj"), sd[f"{h}.attn.c_attn.weight"].split(C)):
            out[f"{a}.{name}.weight"] = w
        out[f"{a}.o_proj.weight"] = sd[f"{h}.attn.c_proj.weight"]
        if cfg.qk_norm:
            for norm, ours in (("q_layernorm", "ln_q"), ("k_layernorm", "ln_k")):
                gain = sd.get(f"{h}.attn.{ours}.weight", torch.ones(D))
                for head in range(cfg.n_head):
                    out[f"{a}.{norm}.norms.{head}.weight"] = gain.clone()  # safetensors: no shared storage
        out.update(_gated_mlp(cfg, sd, h, f"{p}.{i}.mlp", biases=False))
    return {**out, **_head(cfg, sd, "lm_head.weight")}


GPT2 = Architecture(
    "GPT2LMHeadModel", "gpt2",
    "GPT-2: learned position embeddings, LayerNorm, the MLP's activation as `activation_function`; "
    "minigpt's linear weights transposed into GPT-2's Conv1D layout",
    gpt2_config, gpt2_weights)
GPT_NEOX = Architecture(
    "GPTNeoXForCausalLM", "gpt_neox",
    "GPT-NeoX with sequential residuals (`use_parallel_residual: false`) and rotary embeddings over "
    "the whole head (`partial_rotary_factor: 1.0`, base 10000); q, k and v fused per head",
    gpt_neox_config, gpt_neox_weights)
LLAMA = Architecture(
    "LlamaForCausalLM", "llama",
    "Llama with rotary embeddings (base 10000) and RMSNorm; minigpt's MLP as Llama's gated one with "
    "`up_proj` fixed at 1 (zero weights, bias 1), an extra n_embd x 4n_embd matrix of zeros per layer",
    llama_config, llama_weights)
QWEN3 = Architecture(
    "Qwen3ForCausalLM", "qwen3",
    "Qwen3: RMSNorm, rotary embeddings over the whole head (base 10000), per-head RMS q_norm / k_norm "
    "with learnt weights before the rotation (minigpt's QK-norm under `--qk-norm-weight`), SwiGLU MLP "
    "(minigpt's c_fc split into gate_proj and up_proj), no biases",
    qwen3_config, qwen3_weights)
PERSIMMON = Architecture(
    "PersimmonForCausalLM", "persimmon",
    "Persimmon: LayerNorm, rotary embeddings over the whole head (`partial_rotary_factor: 1.0`, base "
    "10000), and its per-head QK LayerNorm before the rotation (`qk_layernorm: true`, weight 1, bias "
    "0), which is minigpt's QK-norm under `--qk-norm-order before_rope`; q, k and v fused per head",
    persimmon_config, persimmon_weights)
STABLELM = Architecture(
    "StableLmForCausalLM", "stablelm",
    "StableLM: LayerNorm, rotary embeddings over the whole head (`partial_rotary_factor: 1.0`, base "
    "10000), per-head LayerNorms of queries and keys before the rotation (`qk_layernorm`; one module "
    "per head, each with the gains minigpt's heads share), SwiGLU MLP (minigpt's c_fc split into "
    "gate_proj and up_proj), sequential residuals, no biases but the norms' (zero)",
    stablelm_config, stablelm_weights)
