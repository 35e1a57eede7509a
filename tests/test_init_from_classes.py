"""`train --init-from DIR` for the classes minigpt exports besides GPT-2 (GPT-NeoX, Llama, Persimmon,
Qwen3, StableLM): an export comes back in computing the same logits and the same validation loss, a stock
transformers checkpoint of those classes initialises a run with transformers' own logits, and what
minigpt cannot compute exactly is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import minigpt
from conftest import CORPUS, TINY
from minigpt import checkpoint as ckpt
from minigpt import rundir
from minigpt.config import ModelConfig, TrainConfig
from minigpt.errors import CheckpointError
from minigpt.interop import hf_import
from minigpt.interop.hf import export_hf
from minigpt.model import GPT
from minigpt.tokenization import CharTokenizer

EVAL = dict(batch_size=8, eval_iters=2, sample_tokens=0, progress=False)
LAYOUTS = {  # id -> (switches, the class the export is)
    "neox": (dict(arch="modern", qk_norm=False), "GPTNeoXForCausalLM"),
    "neox-untied-no-bias": (dict(arch="modern", qk_norm=False, tie_embeddings=False, bias=False),
                            "GPTNeoXForCausalLM"),
    "llama": (dict(arch="modern", qk_norm=False, norm="rmsnorm"), "LlamaForCausalLM"),
    "llama-swiglu": (dict(arch="portable", qk_norm=False), "LlamaForCausalLM"),
    "persimmon": (dict(arch="modern"), "PersimmonForCausalLM"),
    "persimmon-gains-gelu": (dict(arch="modern", qk_norm_weight=True, activation="gelu"),
                             "PersimmonForCausalLM"),
    "qwen3": (dict(arch="portable"), "Qwen3ForCausalLM"),
    "qwen3-untied": (dict(arch="portable", tie_embeddings=False), "Qwen3ForCausalLM"),
    "stablelm": (dict(arch="stablelm"), "StableLmForCausalLM"),
    "stablelm-no-qk-norm-untied": (dict(arch="stablelm", qk_norm=False, tie_embeddings=False),
                                   "StableLmForCausalLM"),
}


def random_run(path: Path, **layout) -> GPT:
    """A run directory holding a tiny GPT with random weights (biases and norm gains included)."""
    tok = CharTokenizer.train([CORPUS])
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=32,
                      **layout)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path.mkdir(parents=True)
    rundir.write_config(path, cfg, TrainConfig(out=str(path)))
    rundir.write_tokenizer(path, tok)
    ckpt.save_checkpoint(path, 1, model, None, {"val_loss": 2.0}, keep=1, is_best=True)
    return model.eval()


@pytest.mark.parametrize("name", LAYOUTS)
def test_an_export_reads_back_as_the_same_model(tmp_path, name):
    layout, cls = LAYOUTS[name]
    model = random_run(tmp_path / "run", **layout)
    assert export_hf(tmp_path / "run", tmp_path / "hf")["architecture"] == cls
    cfg, state, tok, _ = hf_import.load_hf_dir(tmp_path / "hf")
    back = GPT(cfg)
    back.load_state_dict(state, strict=not cfg.tie_embeddings)  # tied: lm_head is wte
    back.eval()
    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], model(x)[0], atol=1e-5, rtol=0)
    for key in ("pos_emb", "norm", "activation", "qk_norm", "tie_embeddings", "n_layer", "n_embd"):
        assert getattr(cfg, key) == getattr(model.config, key), key
    assert tok.kind == "char"


@pytest.mark.parametrize("name", ["neox", "llama", "persimmon", "qwen3", "stablelm"])
def test_export_then_init_from_starts_at_the_sources_validation_loss(tmp_path, name):
    text = tmp_path / "a.txt"
    text.write_text(CORPUS, encoding="utf-8")
    src = tmp_path / "src"
    minigpt.train(data=str(text), out=str(src), max_iters=20, eval_interval=20,
                  **{**TINY, **LAYOUTS[name][0], "progress": False})
    export_hf(src, tmp_path / "export")
    minigpt.train(data=str(text), out=str(tmp_path / "ft"), init_from=str(tmp_path / "export"),
                  max_iters=1, eval_interval=1, seed=1337, **EVAL)
    first = next(r for r in rundir.read_metrics(tmp_path / "ft") if "val_loss" in r)
    source_last = [r for r in rundir.read_metrics(src) if r.get("val_loss") is not None][-1]
    assert first["iter"] == 0
    assert first["val_loss"] == pytest.approx(source_last["val_loss"], abs=1e-4)


# --- stock transformers checkpoints ---------------------------------------------------------------

STOCK = {  # class -> config fields beyond the sizes; each the class's own defaults otherwise
    "Qwen3ForCausalLM": dict(intermediate_size=96, head_dim=16, num_key_value_heads=2,
                             rope_theta=10000.0),
    "LlamaForCausalLM": dict(intermediate_size=96, num_key_value_heads=2, rope_theta=10000.0),
    # minigpt's StableLM layout has no biases: the stock class's LayerNorm biases are zeroed
    "StableLmForCausalLM": dict(intermediate_size=96, num_key_value_heads=2, rope_theta=10000.0,
                                partial_rotary_factor=1.0, qk_layernorm=False),
    "GPTNeoXForCausalLM": dict(intermediate_size=128, rotary_pct=1.0, rotary_emb_base=10000,
                               use_parallel_residual=False, hidden_act="gelu"),
}


def stock_dir(transformers, cls: str, path: Path, **changes) -> torch.nn.Module:
    """A tiny random `cls` saved by transformers, with a minigpt char tokenizer beside it."""
    tok = CharTokenizer.train([CORPUS])
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    fields = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    fields.update(STOCK[cls])
    if "rope_theta" in fields and int(transformers.__version__.split(".")[0]) >= 5:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    fields.update(changes)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config_cls(**fields)).eval()
    with torch.no_grad():  # norm gains away from 1: the test sees that they are read
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        if cls == "StableLmForCausalLM":
            for name, p in model.named_parameters():
                if name.endswith("layernorm.bias") or name == "model.norm.bias":
                    p.zero_()
    model.save_pretrained(path, safe_serialization=True)
    from minigpt.interop.hf_tokenizer import tokenizer_files

    for name, text in tokenizer_files(tok, 32, bos_prompts=False).items():
        (path / name).write_text(text, encoding="utf-8")
    return model


@pytest.mark.parametrize("cls", STOCK)
def test_a_stock_checkpoint_initialises_a_run_with_transformers_logits(tmp_path, cls):
    transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")
    model = stock_dir(transformers, cls, tmp_path / "stock")
    (tmp_path / "a.txt").write_text(CORPUS, encoding="utf-8")
    minigpt.train(data=str(tmp_path / "a.txt"), out=str(tmp_path / "run"),
                  init_from=str(tmp_path / "stock"), max_iters=1, **EVAL)
    engine = minigpt.load(tmp_path / "run", checkpoint="0")
    x = torch.randint(0, engine.model.config.vocab_size, (2, 32),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(engine.model(x)[0], model(x).logits, atol=1e-4, rtol=0)


REFUSED = {  # (class, config change) -> words of the one line
    "grouped KV heads": ("Qwen3ForCausalLM", dict(num_key_value_heads=1), "num_key_value_heads 1"),
    "other MLP width": ("LlamaForCausalLM", dict(intermediate_size=64), "intermediate_size 64"),
    "parallel residuals": ("GPTNeoXForCausalLM", dict(use_parallel_residual=True),
                           "use_parallel_residual True"),
    "partial rotary": ("GPTNeoXForCausalLM", dict(rotary_pct=0.25), "over 0.25 of each head"),
    "qkv biases": ("StableLmForCausalLM", dict(use_qkv_bias=True), "use_qkv_bias True"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_minigpt_cannot_compute_is_refused_in_one_line(tmp_path, case):
    transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")
    cls, change, words = REFUSED[case]
    stock_dir(transformers, cls, tmp_path / "stock", **change)
    with pytest.raises(CheckpointError, match="reads only what minigpt computes exactly") as e:
        hf_import.load_hf_dir(tmp_path / "stock")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_biased_qk_norm_is_refused_naming_the_tensor(tmp_path):
    random_run(tmp_path / "run", arch="modern")
    export_hf(tmp_path / "run", tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["model.layers.0.self_attn.q_layernorm.bias"] += 0.5  # Persimmon's; minigpt has none
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_layernorm.bias is not the constant"):
        hf_import.load_hf_dir(tmp_path / "hf")


def test_stablelm_per_head_norms_that_differ_are_refused(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")
    stock_dir(transformers, "StableLmForCausalLM", tmp_path / "stock", qk_layernorm=True)
    with pytest.raises(CheckpointError, match="holds different values where minigpt shares one"):
        hf_import.load_hf_dir(tmp_path / "stock")


def test_an_unsupported_class_names_the_supported_ones(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="holds a 'mamba' model; --init-from reads GPT-2, "
                                              "GPT-NeoX, Llama, Persimmon, Qwen3 and StableLM "
                                              r"directories \(config.json model_type gpt2, "
                                              r"gpt_neox, llama, persimmon, qwen3, stablelm\) or "
                                              "minigpt runs"):
        hf_import.load_hf_dir(tmp_path / "m")
    shutil.rmtree(tmp_path / "m")
