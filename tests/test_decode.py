"""The lean decoding step computes what GPT.forward computes, for every layout."""

from __future__ import annotations

import pytest
import torch

from minigpt.config import ModelConfig
from minigpt.decode import DecodeStep
from minigpt.kv_cache import KVCache
from minigpt.model import GPT

LAYOUTS = {
    "gpt2": dict(arch="gpt2"),
    "modern": dict(arch="modern"),
    "rmsnorm-untied-nobias": dict(arch="modern", norm="rmsnorm", tie_embeddings=False, bias=False),
    "gelu-no-qk-norm": dict(arch="modern", activation="gelu", qk_norm=False),
    "gpt2-layernorm-qk": dict(arch="gpt2", qk_norm=True, bias=False),
    "modern-qk-norm-before-rope": dict(arch="modern", qk_norm_order="before_rope"),
    "rmsnorm-qk-norm-before-rope": dict(arch="modern", norm="rmsnorm", qk_norm_order="before_rope",
                                        bias=False),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_decode_step_matches_the_model_forward_at_every_position(layout):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16, **LAYOUTS[layout])
    model = GPT(cfg).eval()
    for p in model.parameters():  # not the init's ones and zeros: every weight must matter
        p.data.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, 23, (3, cfg.block_size))
    with torch.inference_mode():
        full, _ = model(tokens)  # no cache: every position in one causal forward
        cache = KVCache.for_model(model, 3)
        model(tokens[:, :4], kv_cache=cache)
        step = DecodeStep(model)
        for t in range(4, cfg.block_size):
            logits = step(tokens[:, t], cache)
            assert cache.pos == t + 1
            torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="exceeds block_size"):
            step(tokens[:, 0], cache)


def test_decode_step_sees_weights_changed_after_it_was_made():
    cfg = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, arch="modern")
    model = GPT(cfg).eval()
    step = DecodeStep(model)
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1)
        before = step(torch.tensor([3]), cache)
        model.h[0].mlp.c_fc.weight.add_(1.0)  # an optimizer step updates parameters in place
        cache.reset()
        after = step(torch.tensor([3]), cache)
    assert not torch.equal(before, after)
