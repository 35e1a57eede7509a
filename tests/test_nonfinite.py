"""Non-finite loss or gradients: the step is skipped and counted; too many in a row stop the run.

The NaN/inf is injected into the real training loop by wrapping GPT.forward: either the loss itself
becomes NaN, or the loss stays finite and its gradient becomes inf (a custom autograd function).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint as ckpt
from minigpt import rundir, train
from minigpt.config import ModelConfig
from minigpt.data.corpus import bundled_corpus
from minigpt.errors import CheckpointError, TrainingDiverged
from minigpt.model import GPT
from minigpt.training.nonfinite import step_unless_bad

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2,
            sample_tokens=0, progress=False)


class _InfGrad(torch.autograd.Function):
    """Identity forward, inf backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(bundled_corpus().read_text(encoding="utf-8")[:5000], encoding="utf-8")
    return path



def poison(monkeypatch, bad_steps: set[int], kind: str) -> list[dict[str, torch.Tensor]]:
    """Make training steps in `bad_steps` (0-based) non-finite; returns weights seen at each step."""
    real_forward = GPT.forward
    seen: list[dict[str, torch.Tensor]] = []

    def forward(self, idx, targets=None, kv_cache=None):
        logits, loss = real_forward(self, idx, targets, kv_cache)
        if self.training and targets is not None:  # a training step (grad_accum is 1)
            step = len(seen)
            seen.append({k: v.detach().clone() for k, v in self.state_dict().items()})
            if step in bad_steps:
                loss = loss * math.nan if kind == "nan-loss" else _InfGrad.apply(loss)
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    return seen


@pytest.mark.parametrize("kind", ["nan-loss", "inf-gradient"])
def test_a_non_finite_step_is_skipped_and_counted(corpus, monkeypatch, kind):
    run = corpus.parent / "run"
    seen = poison(monkeypatch, {3, 7}, kind)
    summary = train(data=str(corpus), out=str(run), max_iters=12, eval_interval=6, log_interval=2,
                    **TINY)
    assert summary["skipped_steps"] == 2
    for bad in (3, 7):  # the weights going into the next step are the ones the bad step started from
        assert all(torch.equal(seen[bad][k], seen[bad + 1][k]) for k in seen[bad])
    assert not all(torch.equal(seen[2][k], seen[3][k]) for k in seen[2])  # good steps do move
    path, meta, _ = ckpt.find_checkpoint(run, "last")
    state = ckpt.load_trainer_state(path)
    assert state["skipped_steps"] == 2
    # 12 - 2 updates, counted by the AdamW half of the optimizer (Muon's buffers keep no count)
    steps = [int(s["step"]) for s in state["optimizer"]["state"].values() if "step" in s]
    assert steps and all(n == 10 for n in steps)
    metrics = [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]
    assert [m["skipped_steps"] for m in metrics if m["iter"] in (2, 4, 8, 12)] == [0, 1, 2, 2]
    assert all(math.isfinite(m["train_loss"]) for m in metrics)  # skipped losses are not averaged in
    assert math.isfinite(meta["val_loss"])


def test_too_many_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(corpus, monkeypatch):
    run = corpus.parent / "run"
    poison(monkeypatch, set(range(12, 100)), "nan-loss")  # from step 13 on, every step diverges
    with pytest.raises(TrainingDiverged) as info:
        train(data=str(corpus), out=str(run), max_iters=30, eval_interval=5, max_bad_steps=3, **TINY)
    assert str(info.value) == (
        "training stopped at step 15: 3 steps in a row had a NaN or inf loss or gradient and were "
        "skipped; the last good checkpoint, step 10, is kept. Lower --lr or raise --warmup-iters, "
        "then --resume"
    )
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [5, 10]  # nothing saved after divergence
    best, meta, _ = ckpt.find_checkpoint(run, "best")
    assert math.isfinite(meta["val_loss"])
    for _, path in ckpt.list_checkpoints(run):
        model = GPT(rundir.read_config(run)[0])
        ckpt.load_weights(model, path / ckpt.WEIGHTS)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_isolated_bad_steps_below_the_limit_do_not_stop_the_run(corpus, monkeypatch):
    poison(monkeypatch, {2, 3, 6, 7}, "nan-loss")  # two pairs; the limit is three in a row
    summary = train(data=str(corpus), out=str(corpus.parent / "run"), max_iters=10, eval_interval=5,
                    max_bad_steps=3, **TINY)
    assert summary["step"] == 10 and summary["skipped_steps"] == 4


def test_weights_with_nan_are_never_saved(tmp_path):
    model = GPT(ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))
    ckpt.save_checkpoint(tmp_path, 1, model, None, {"val_loss": 2.0}, is_best=True)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = math.nan
    with pytest.raises(CheckpointError, match="refusing to save checkpoint at step 2: .* holds NaN or inf"):
        ckpt.save_checkpoint(tmp_path, 2, model, None, {"val_loss": 1.0}, is_best=True)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.best_step(tmp_path) == 1


def _skip_sequence(sync: bool) -> torch.Tensor:
    """A good step, a NaN step, a good step; checks the NaN step changed nothing."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=True)
    p.grad = torch.randn(4, 4)
    step_unless_bad(opt, torch.tensor(False), sync=sync)
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((4, 4), math.nan)
    step_unless_bad(opt, torch.tensor(True), sync=sync)
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in opt.state[p].items())  # moments, step
    p.grad = torch.ones(4, 4)
    step_unless_bad(opt, torch.tensor(False), sync=sync)
    assert not torch.equal(p.detach(), before[0]) and int(opt.state[p]["step"]) == 2
    return p.detach()


def test_both_ways_of_skipping_skip_everything_and_agree():
    """The CPU's host check and the accelerators' fused found_inf (tested here on the CPU)."""
    assert torch.equal(_skip_sequence(sync=True), _skip_sequence(sync=False))


@pytest.mark.parametrize("kind", ["nan-loss", "inf-gradient"])
def test_the_reference_engine_skips_non_finite_steps_too(corpus, monkeypatch, kind):
    from minigpt.reference import model as R

    real, calls = R.loss_and_grads, []

    def poisoned(params, cfg, x, y):
        loss, grads = real(params, cfg, x, y)
        calls.append(loss)
        if len(calls) in (4, 8):  # training steps 3 and 7 (no accumulation)
            if kind == "nan-loss":
                loss = math.nan
            else:
                grads["wte.weight"][0, 0] = math.inf
        return loss, grads

    monkeypatch.setattr(R, "loss_and_grads", poisoned)
    run = corpus.parent / "run"
    summary = train(data=str(corpus), out=str(run), backend="reference", max_iters=12, eval_interval=12,
                    log_interval=2, **TINY)
    assert len(calls) == 12 and summary["skipped_steps"] == 2
    path, _, _ = ckpt.find_checkpoint(run, "last")
    state = ckpt.load_trainer_state(path)
    assert state["skipped_steps"] == 2
    assert all(int(s["step"]) == 10 for s in state["optimizer"]["state"].values())  # 12 - 2 updates
    model = GPT(rundir.read_config(run)[0])
    ckpt.load_weights(model, path / ckpt.WEIGHTS)
    assert all(torch.isfinite(p).all() for p in model.parameters())
