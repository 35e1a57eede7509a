"""Muon: orthogonalised updates for hidden matrices, AdamW for the rest, resumable state."""

from __future__ import annotations

import copy

import pytest
import torch

from minigpt.config import ModelConfig, TrainConfig
from minigpt.model import GPT
from minigpt.training.optim import MuonAdamW, make_optimizer, orthogonalize, set_lr

TINY = dict(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16, arch="modern")


def one_step(model: GPT, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 23, (4, 16), generator=g)
    _, loss = model(x, x.roll(-1, dims=1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_orthogonalize_flattens_the_spectrum():
    g = torch.randn(3, 8, 32) * torch.logspace(-1, 1, 8)[:, None]  # rows scaled over 2 decades
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.max() < 1.3 and s.min() > 0.5


def test_muon_step_changes_every_matrix_and_keeps_shapes():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    tcfg = TrainConfig(optimizer="muon", warmup_iters=0)
    opt = make_optimizer(model, tcfg)
    assert isinstance(opt, MuonAdamW)
    muon_params = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    # hidden matrices take Muon; embeddings, head and norm gains take AdamW
    for name, p in model.named_parameters():
        assert (id(p) in muon_params) == (name.startswith("h.") and p.dim() == 2), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_lr(opt, 0, tcfg)
    one_step(model, opt, seed=0)
    one_step(model, opt, seed=1)  # two steps: an untied head starts at zero and moves first
    for name, p in model.named_parameters():
        assert p.shape == before[name].shape
        if p.dim() == 2:
            assert not torch.equal(p, before[name]), f"{name} did not move"
    # a Muon update has about the same size in every direction its gradient spans: the singular
    # values are alike, except where the gradient has none (LayerNorm'd inputs have zero mean, so
    # one input direction gets no gradient at all)
    w = dict(model.named_parameters())["h.0.mlp.c_fc.weight"]
    before_third = w.detach().clone()
    one_step(model, opt, seed=2)
    s = torch.linalg.svdvals(w.detach() - before_third)
    spanned = s[s > 0.1 * s.max()]
    assert len(spanned) >= len(s) - 1 and spanned.max() / spanned.min() < 3


def test_schedule_scales_each_group_from_its_own_peak():
    model = GPT(ModelConfig(**TINY))
    tcfg = TrainConfig(optimizer="muon", lr=2e-3, muon_lr=0.04, min_lr=2e-4, warmup_iters=0,
                       max_iters=100)
    opt = make_optimizer(model, tcfg)
    set_lr(opt, 100, tcfg)  # end of the schedule: every group at min_lr / lr of its peak
    lrs = {g["muon"]: g["lr"] for g in opt.param_groups}
    assert lrs[True] == pytest.approx(0.004) and lrs[False] == pytest.approx(2e-4)


def test_muon_state_round_trips_for_exact_resume():
    tcfg = TrainConfig(optimizer="muon")
    torch.manual_seed(0)
    a = GPT(ModelConfig(**TINY))
    opt_a = make_optimizer(a, tcfg)
    one_step(a, opt_a, seed=1)
    b = GPT(ModelConfig(**TINY))
    b.load_state_dict(a.state_dict())
    opt_b = make_optimizer(b, tcfg)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read back from disk
    one_step(a, opt_a, seed=2)
    one_step(b, opt_b, seed=2)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
