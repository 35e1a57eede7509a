"""The training-memory estimate users size GPU runs with: checked against what autograd really keeps."""

from __future__ import annotations

import pytest
import torch

from minigpt.cli import main
from minigpt.config import ModelConfig, resolve
from minigpt.model import GPT
from minigpt.tools.info import muon_param_count, param_count
from minigpt.tools.memory import format_bytes, training_memory


def saved_for_backward(model: GPT, x: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of every distinct tensor storage autograd keeps for the backward pass, weights excluded."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not torch.float32):
            model(x, x)
    return sum(n for ptr, n in storages.items() if ptr not in weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 2, 64, 64, 67, 8), (3, 4, 96, 48, 500, 4)])
@pytest.mark.parametrize("layout", [dict(arch="gpt2"), dict(arch="modern", qk_norm_order="after_rope"),
                                    dict(arch="modern", qk_norm_order="before_rope"),
                                    dict(arch="gpt2", qk_norm=True)],
                         ids=["gpt2", "modern-qk-norm-after-rope", "modern-qk-norm-before-rope", "qk-norm"])
def test_activation_estimate_matches_what_autograd_saves(shape, dtype, layout):
    n_layer, n_head, n_embd, block, vocab, batch = shape
    cfg = ModelConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      **layout)
    model = GPT(cfg)
    est = training_memory(cfg, model.num_params(), batch, mixed_precision=dtype is not torch.float32)
    measured = saved_for_backward(model, torch.randint(0, vocab, (batch, block)), dtype)
    # what the estimate says autograd keeps: activations, the bf16 weight copies, the fp32 log-softmax
    expected = est.activations + est.autocast_copies + 4 * batch * block * vocab
    assert measured == pytest.approx(expected, rel=0.08)  # measured: 2-5% under


def test_static_memory_is_16_bytes_per_parameter_and_activations_scale_with_batch():
    cfg = ModelConfig(vocab_size=67, block_size=256, n_layer=12, n_head=6, n_embd=384)
    n = param_count(cfg)
    one, two = (training_memory(cfg, n, b, mixed_precision=True) for b in (32, 64))
    assert one.weights + one.gradients + one.optimizer == 16 * n
    assert two.activations == 2 * one.activations
    assert training_memory(cfg, n, 32, mixed_precision=False).activations > one.activations


def test_info_shows_memory_per_preset_and_a_breakdown(capsys):
    assert main(["info"]) == 0
    table = capsys.readouterr().out
    assert "mem fp32" in table and "mem bf16" in table
    large = next(line for line in table.splitlines() if line.startswith("large"))
    cfg, tcfg = resolve("large", overrides={"vocab_size": 67})
    assert tcfg.optimizer == "muon"  # the default recipe: hidden matrices keep one buffer, not two
    muon = muon_param_count(cfg)
    assert 0.8 * param_count(cfg) < muon < param_count(cfg)
    est = training_memory(cfg, param_count(cfg), 64, mixed_precision=True, muon_params=muon)
    assert est.optimizer == 8 * param_count(cfg) - 4 * muon
    assert format_bytes(est.total) in large

    assert main(["info", "--preset", "large", "--batch-size", "8"]) == 0
    detail = capsys.readouterr().out
    assert "batch-size 8 per device" in detail
    est8 = training_memory(cfg, param_count(cfg), 8, mixed_precision=True, muon_params=muon)
    total = next(line for line in detail.splitlines() if line.startswith("total"))
    assert format_bytes(est8.total) in total
