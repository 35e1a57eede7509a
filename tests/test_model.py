import math

import torch

from minigpt.config import ModelConfig
from minigpt.kv_cache import KVCache
from minigpt.model import GPT


def tiny_model(**over) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32), **over})
    return GPT(cfg).eval()


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 50
    a, _ = model(x)
    b, _ = model(y)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_initial_loss_is_about_ln_vocab():
    model = tiny_model()
    x = torch.randint(0, 50, (8, 16))
    _, loss = model(x, torch.randint(0, 50, (8, 16)))
    assert abs(loss.item() - math.log(50)) < 0.1


def test_kv_cache_decoding_equals_full_forward():
    model = tiny_model()
    x = torch.randint(0, 50, (3, 16))
    full, _ = model(x)
    cache = KVCache.for_model(model, 3)
    pieces = [model(x[:, :5], cache=cache)[0], model(x[:, 5:9], cache=cache, pos=5)[0]]
    pieces += [model(x[:, t : t + 1], cache=cache, pos=t)[0] for t in range(9, 16)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_lm_head_is_tied_and_params_count_once():
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_tiny_model_overfits_one_batch():
    model = tiny_model().train()
    x = torch.randint(0, 50, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
