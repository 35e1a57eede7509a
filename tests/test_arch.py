"""Model layouts: every switch trains, stays causal, decodes with the KV cache exactly as a full
forward does, and the GPT-2 layout keeps its GPT-2 parameter names."""

from __future__ import annotations

import pytest
import torch

from minigpt.config import ARCHS, ModelConfig, TrainConfig, model_config_from_dict
from minigpt.engine import Engine
from minigpt.errors import ConfigError
from minigpt.kv_cache import KVCache
from minigpt.model import GPT
from minigpt.sampling import SamplingParams
from minigpt.tokenization.char import CharTokenizer
from minigpt.training.optim import make_optimizer, set_lr

TINY = dict(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16)
# each arch, plus each modern switch alone on top of GPT-2
VARIANTS = {
    "gpt2": dict(arch="gpt2"),
    "modern": dict(arch="modern"),
    "gpt2+rope": dict(arch="gpt2", pos_emb="rope"),
    "gpt2+rmsnorm": dict(arch="gpt2", norm="rmsnorm"),
    "gpt2+relu2": dict(arch="gpt2", activation="relu2"),
    "gpt2+gelu": dict(arch="gpt2", activation="gelu"),
    "gpt2+qk_norm": dict(arch="gpt2", qk_norm=True),
    "gpt2+untied": dict(arch="gpt2", tie_embeddings=False),
    "modern+qk_norm_before_rope": dict(arch="modern", qk_norm_order="before_rope"),
    "modern+rmsnorm+qk_norm_before_rope": dict(arch="modern", norm="rmsnorm",
                                               qk_norm_order="before_rope"),
    "portable": dict(arch="portable"),
    "gpt2+swiglu": dict(arch="gpt2", activation="swiglu"),
    "modern+qk_norm_weight": dict(arch="modern", qk_norm_weight=True),
    "portable+qk_norm_after_rope": dict(arch="portable", qk_norm_order="after_rope"),
}
GPT2_NAMES = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"} | {
    f"h.{i}.{name}"
    for i in range(2)
    for name in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                 "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                 "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
}


def tiny_model(seed: int = 0, **layout) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**TINY, **layout))
    if not model.config.tie_embeddings:  # an untied head starts at zero: give it real logits
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_every_layout_learns(name):
    """A repeating sequence is learnt: the loss falls well below its starting value."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, **VARIANTS[name]))
    for optimizer in ("adamw", "muon"):
        tcfg = TrainConfig(max_iters=60, warmup_iters=5, lr=3e-3, optimizer=optimizer)
        opt = make_optimizer(model, tcfg)
        pattern = torch.arange(17) % 7
        x, y = pattern[:-1].repeat(4, 1), pattern[1:].repeat(4, 1)
        losses = []
        for step in range(60):
            set_lr(opt, step, tcfg)
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], (optimizer, losses[0], losses[-1])
        model = GPT(ModelConfig(**TINY, **VARIANTS[name]))


@pytest.mark.parametrize("name", VARIANTS)
def test_future_tokens_do_not_change_past_logits(name):
    model = tiny_model(**VARIANTS[name])
    idx = torch.randint(0, 23, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % 23
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(name):
    """Prefill 5 tokens, then feed one token at a time, then 3 at once: same logits as one pass."""
    model = tiny_model(**VARIANTS[name])
    idx = torch.randint(0, 23, (3, 16))
    full, _ = model(idx)
    cache = KVCache.for_model(model, batch_size=3)
    parts = [model(idx[:, :5], cache=cache)[0]]
    for t in range(5, 13):
        parts.append(model(idx[:, t : t + 1], cache=cache, pos=t)[0])
    parts.append(model(idx[:, 13:16], cache=cache, pos=13)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_engine_past_the_window_matches_recomputing_the_window(name):
    """Greedy generation beyond block_size: the engine's cache rebuilds give exactly the tokens a
    full forward over the same window gives."""
    model = tiny_model(**VARIANTS[name])
    tok = CharTokenizer.train(["abcdefghijklmnopqrstu"])
    assert tok.vocab_size == model.config.vocab_size
    engine = Engine(model, tok)
    prompt = tok.encode("abcdef")
    got = engine.token_ids(prompt, SamplingParams(max_new_tokens=40, temperature=0,
                                                  stop_at_eos=False))[0]

    T = model.config.block_size
    keep = T - T // 4
    tokens, start = list(prompt), 0
    want = []
    with torch.no_grad():
        for _ in range(40):
            logits, _ = model(torch.tensor([tokens[start:]]))
            nxt = int(logits[0, -1].argmax())
            want.append(nxt)
            tokens.append(nxt)
            if len(tokens) - 1 - start == T:  # the engine's cache was full: it keeps `keep` tokens
                start = len(tokens) - keep
    assert got == want


def test_gpt2_layout_keeps_gpt2_parameter_names():
    model = tiny_model(arch="gpt2")
    from minigpt.checkpoint import weights_state

    assert set(weights_state(model)) == GPT2_NAMES - {"lm_head.weight"}  # tied: stored once
    assert model.lm_head.weight is model.wte.weight


def test_other_layouts_only_drop_or_add_tensors():
    """Rotary drops wpe, an untied head adds lm_head, no biases drops them: nothing is renamed."""
    modern = set(tiny_model(arch="modern").state_dict())
    assert modern == GPT2_NAMES - {"wpe.weight"}
    other = tiny_model(arch="gpt2", pos_emb="rope", tie_embeddings=False, bias=False)
    names = set(other.state_dict())
    assert "wpe.weight" not in names and "lm_head.weight" in names
    assert not any(n.endswith(".bias") for n in names) and names <= GPT2_NAMES
    assert other.lm_head.weight is not other.wte.weight


def test_arch_fills_switches_and_explicit_switches_win():
    cfg = ModelConfig(arch="modern", norm="rmsnorm")
    assert (cfg.pos_emb, cfg.norm, cfg.activation, cfg.qk_norm, cfg.tie_embeddings, cfg.bias) == (
        "rope", "rmsnorm", "relu2", True, True, True)
    default = ModelConfig()
    assert {k: getattr(default, k) for k in ARCHS["gpt2"]} == ARCHS["gpt2"]


def test_config_json_from_before_the_switches_loads_as_gpt2():
    old = dict(vocab_size=67, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True)
    cfg = model_config_from_dict(old)
    assert cfg.arch == "gpt2" and cfg.pos_emb == "learned" and cfg.tie_embeddings is True


def test_qk_norm_order_changes_what_the_model_computes():
    """Normalising before the rotation is a different model from normalising after it (a norm does
    not commute with a rotation): same weights, different logits."""
    after, before = (tiny_model(arch="modern", qk_norm_order=o) for o in ("after_rope", "before_rope"))
    before.load_state_dict(after.state_dict())
    idx = torch.randint(0, 23, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(after(idx)[0], before(idx)[0], atol=1e-4)


def test_config_json_without_qk_norm_order_keeps_the_order_it_was_trained_with(monkeypatch):
    """Every run written before the switch existed normalised after rotary: it reads back that way
    even when the arch it names defaults to the other order for new runs."""
    monkeypatch.setitem(ARCHS, "modern", {**ARCHS["modern"], "qk_norm_order": "before_rope"})
    saved = dict(vocab_size=67, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                 arch="modern", bias=True, pos_emb="rope", norm="layernorm", activation="relu2",
                 qk_norm=True, tie_embeddings=True)
    assert model_config_from_dict(saved).qk_norm_order == "after_rope"
    assert model_config_from_dict({**saved, "qk_norm_order": "before_rope"}).qk_norm_order == "before_rope"
    assert ModelConfig(arch="modern").qk_norm_order == "before_rope"  # a new run: the arch's


@pytest.mark.parametrize("bad, message", [
    (dict(qk_norm_order="middle"), "qk-norm-order must be one of"),
    (dict(arch="llama"), "--arch must be one of gpt2, modern, portable, stablelm; got .llama."),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(activation="swish"), "activation must be one of"),
    (dict(pos_emb="rope", n_embd=12, n_head=4), "even head size"),
])
def test_bad_layouts_are_clear_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**TINY, **bad}).validate()
