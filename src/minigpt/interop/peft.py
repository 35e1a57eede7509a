"""`minigpt export RUN --to peft --out DIR`: a LoRA run's adapters as a PEFT adapter directory.

    DIR/adapter_config.json        LoraConfig: r, lora_alpha, target_modules (the HF class's names)
    DIR/adapter_model.safetensors  base_model.model.<module>.lora_A.weight / lora_B.weight

`peft.PeftModel.from_pretrained(model, DIR)` loads it onto the base run's HF export (`minigpt
export BASE --to hf`, the stock class hf_model.py picks for the layout) and computes what minigpt
computes: W x + (alpha / r) B A x on the same projections (tests/test_lora.py, through peft's own
loader). Every layout that exports to HF has an exact adapter: PEFT's LoRA is the same low-rank sum
whatever the module, so a projection that HF stores differently needs only B's rows rearranged:

    GPT-2       the same four modules; Conv1D stores W transposed, which PEFT's LoRA for Conv1D
                (fan_in_fan_out) reads through the same A (r, in) and B (out, r)
    GPT-NeoX,   query_key_value holds q, k, v per head (hf_model._per_head_qkv): a row permutation
    Persimmon   P of minigpt's c_attn, so P W + s P B A: B's rows permuted the same way
    Llama,      q_proj, k_proj, v_proj each take A and their third of B's rows; a SwiGLU c_fc
    Qwen3       splits into gate_proj and up_proj the same way, any other c_fc is gate_proj
                (up_proj, fixed at 1, has no adapter)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from .. import rundir
from ..config import ModelConfig
from ..errors import ConfigError
from . import hf_model
from .hf import check_out_dir, write_directory

Pair = tuple[torch.Tensor, torch.Tensor]  # (A, B)


def _same(name: str) -> Callable[[ModelConfig, Pair], dict[str, Pair]]:
    return lambda cfg, ab: {name: ab}


def _per_head(name: str) -> Callable[[ModelConfig, Pair], dict[str, Pair]]:
    return lambda cfg, ab: {name: (ab[0], hf_model._per_head_qkv(cfg, ab[1]))}


def _split_qkv(cfg: ModelConfig, ab: Pair) -> dict[str, Pair]:
    return {f"self_attn.{n}": (ab[0], b) for n, b in zip(("q_proj", "k_proj", "v_proj"),
                                                          ab[1].split(cfg.n_embd))}


def _gated_fc(cfg: ModelConfig, ab: Pair) -> dict[str, Pair]:
    """SwiGLU's c_fc is [gate; up] rows: gate_proj and up_proj each take A and their half of B's
    rows. Any other activation's c_fc is gate_proj alone (up_proj, fixed at 1, has no adapter)."""
    if cfg.activation != "swiglu":
        return {"mlp.gate_proj": ab}
    gate, up = ab[1].chunk(2)
    return {"mlp.gate_proj": (ab[0], gate), "mlp.up_proj": (ab[0], up)}


# HF class -> (a layer's module prefix, minigpt target -> the HF module(s) and their (A, B))
MODULES: dict[str, tuple[str, dict[str, Callable[[ModelConfig, Pair], dict[str, Pair]]]]] = {
    hf_model.GPT2.name: ("transformer.h.{i}.", {
        "attn.c_attn": _same("attn.c_attn"), "attn.c_proj": _same("attn.c_proj"),
        "mlp.c_fc": _same("mlp.c_fc"), "mlp.c_proj": _same("mlp.c_proj")}),
    hf_model.GPT_NEOX.name: ("gpt_neox.layers.{i}.", {
        "attn.c_attn": _per_head("attention.query_key_value"),
        "attn.c_proj": _same("attention.dense"), "mlp.c_fc": _same("mlp.dense_h_to_4h"),
        "mlp.c_proj": _same("mlp.dense_4h_to_h")}),
    hf_model.PERSIMMON.name: ("model.layers.{i}.", {
        "attn.c_attn": _per_head("self_attn.query_key_value"),
        "attn.c_proj": _same("self_attn.dense"), "mlp.c_fc": _same("mlp.dense_h_to_4h"),
        "mlp.c_proj": _same("mlp.dense_4h_to_h")}),
    hf_model.LLAMA.name: ("model.layers.{i}.", {
        "attn.c_attn": _split_qkv, "attn.c_proj": _same("self_attn.o_proj"),
        "mlp.c_fc": _gated_fc, "mlp.c_proj": _same("mlp.down_proj")}),
}
# Qwen3 and StableLM name their projections as Llama does
MODULES[hf_model.QWEN3.name] = MODULES[hf_model.STABLELM.name] = MODULES[hf_model.LLAMA.name]


def peft_tensors(cfg: ModelConfig, adapters: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """minigpt adapter tensors (h.I.TARGET.lora_A/B) -> (PEFT's saved names -> tensors, the
    target_modules that name those modules)."""
    arch = hf_model.architecture(cfg)
    prefix, table = MODULES[arch.name]
    out: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for i in range(cfg.n_layer):
        for target in cfg.lora_targets:
            ab = (adapters[f"h.{i}.{target}.lora_A"], adapters[f"h.{i}.{target}.lora_B"])
            for module, (a, b) in table[target](cfg, ab).items():
                name = "base_model.model." + prefix.format(i=i) + module
                out[f"{name}.lora_A.weight"] = a.clone()  # a shared A is stored per module
                out[f"{name}.lora_B.weight"] = b.clone()
                if module not in modules:
                    modules.append(module)
    return out, modules


def adapter_config(cfg: ModelConfig, modules: list[str]) -> dict[str, Any]:
    """PEFT's LoraConfig for these adapters; PEFT matches each target_modules entry against the
    end of a module's dotted name."""
    arch = hf_model.architecture(cfg)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "target_modules": modules,
            "bias": "none", "fan_in_fan_out": arch is hf_model.GPT2, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": None, "modules_to_save": None}


def export_peft(run_dir: str | Path, out: str | Path, checkpoint: str = "best",
                overwrite: bool = False) -> dict[str, Any]:
    """Write LoRA run `run_dir`'s adapters at `checkpoint` as a PEFT adapter directory."""
    run_dir, out = Path(run_dir), Path(out)
    mcfg, tcfg = rundir.read_config(run_dir)
    if not mcfg.lora_rank:
        raise ConfigError(f"cannot export {run_dir} to peft: it has no LoRA adapters (train one "
                          "with --lora-rank R); export the whole model with --to hf")
    refused = hf_model.refusal(mcfg)
    if refused:  # its base has no HF class to load the adapters onto
        raise ConfigError(f"cannot export {run_dir} to peft: {refused[0]}")
    check_out_dir(out, overwrite, marker="adapter_config.json", what="PEFT adapter")
    path, meta = ckpt.find_for_inference(run_dir, checkpoint)
    ckpt.base_state(run_dir, mcfg, tcfg)  # the adapters are only worth their base: it must be there
    tensors, modules = peft_tensors(mcfg, ckpt.read_weights(path / ckpt.ADAPTER))
    config = adapter_config(mcfg, modules)
    write_directory(out, {"adapter_config.json": json.dumps(config, indent=2) + "\n"}, tensors,
                     weights_name="adapter_model.safetensors")
    return {"run_dir": str(run_dir), "out": str(out), "step": meta.get("step"),
            "architecture": hf_model.architecture(mcfg).name, "base": tcfg.init_from,
            "base_step": tcfg.init_step, "tensors": len(tensors),
            "params": sum(t.numel() for t in tensors.values())}
