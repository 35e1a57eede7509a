"""Decoding runs the training forward: for every layout, logits of a prompt prefilled into the KV
cache, then of one token per row at a time (every row at one position, or each row at its own),
equal the logits of one causal pass over the whole sequence."""

from __future__ import annotations

import pytest
import torch

from minigpt.config import ModelConfig
from minigpt.kv_cache import KVCache
from minigpt.model import GPT

LAYOUTS = {
    "gpt2": dict(arch="gpt2"),
    "modern": dict(arch="modern"),
    "modern-qk-norm-after-rope": dict(arch="modern", qk_norm_order="after_rope"),
    "rmsnorm-untied-nobias": dict(arch="modern", norm="rmsnorm", tie_embeddings=False, bias=False),
    "gelu-no-qk-norm": dict(arch="modern", activation="gelu", qk_norm=False),
    "gpt2-layernorm-qk": dict(arch="gpt2", qk_norm=True, bias=False),
    "rmsnorm-qk-norm-before-rope": dict(arch="modern", norm="rmsnorm", qk_norm_order="before_rope",
                                        bias=False),
}


def random_model(layout: str) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16, **LAYOUTS[layout])
    model = GPT(cfg).eval()
    for p in model.parameters():  # not the init's ones and zeros: every weight must matter
        p.data.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_decoding_one_position_for_every_row_matches_the_training_forward(layout):
    model = random_model(layout)
    T = model.config.block_size
    tokens = torch.randint(0, 23, (3, T))
    with torch.inference_mode():
        full, _ = model(tokens)  # no cache: every position in one causal forward
        cache = KVCache.for_model(model, 3)
        last, _ = model(tokens[:, :4], cache=cache, last_only=True)  # a prefill
        torch.testing.assert_close(last[:, 0], full[:, 3], rtol=1e-5, atol=1e-5)
        for t in range(4, T):
            logits, _ = model(tokens[:, t : t + 1], cache=cache, pos=t)
            torch.testing.assert_close(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="exceeds block_size"):
            model(tokens[:, :1], cache=cache, pos=T)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "tensor"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_decoding_rows_at_their_own_positions_matches_the_training_forward(layout, as_tensor):
    """Positions as a list narrow the keys to the longest row; as a tensor (the compiled step's
    static shapes) every row attends over the whole window, the keys past its length masked."""
    model = random_model(layout)
    tokens = torch.randint(0, 23, (3, model.config.block_size))
    lengths = [2, 7, 5]  # each row's cached positions: rows of a continuous batch
    with torch.inference_mode():
        full, _ = model(tokens)
        cache = KVCache.for_model(model, 3)
        for r, n in enumerate(lengths):
            model(tokens[r : r + 1, :n], cache=cache.rows(r))
        rows = torch.arange(3)
        for t in range(5):
            pos = [n + t for n in lengths]
            logits, _ = model(tokens[rows, pos].view(3, 1), cache=cache,
                              pos=torch.tensor(pos) if as_tensor else pos)
            torch.testing.assert_close(logits[:, 0], full[rows, pos], rtol=1e-5, atol=1e-5)


def test_per_row_positions_take_one_token_per_row():
    model = random_model("modern")
    cache = KVCache.for_model(model, 2)
    with pytest.raises(ValueError, match="one token per row"):
        model(torch.zeros(2, 2, dtype=torch.long), cache=cache, pos=[0, 1])
    with pytest.raises(ValueError, match="one token per row"):
        model(torch.zeros(2, 2, dtype=torch.long), cache=cache, pos=torch.tensor([0, 1]))


def test_decoding_sees_weights_changed_in_place_after_the_first_forward():
    """Outside training the blocks' tensors are gathered once; an optimizer step (or a load)
    updates those same tensors in place, and .to() gathers them again."""
    model = random_model("modern")
    tokens = torch.tensor([[3, 1, 4]])
    with torch.inference_mode():
        before, _ = model(tokens)
        model.h[0].mlp.c_fc.weight.add_(1.0)
        after, _ = model(tokens)
        assert not torch.equal(before, after)
        model.to(torch.float64)
        again, _ = model(tokens)
    assert again.dtype == torch.float64
    torch.testing.assert_close(again.float(), after, rtol=1e-4, atol=1e-4)
