"""Mixed precision on the CPU: the autocast / GradScaler code that GPU runs execute, trained for real."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

import minigpt
from minigpt import checkpoint as ckpt
from minigpt import rundir

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, lr=3e-3, min_lr=3e-4,
            warmup_iters=2, eval_iters=2, log_interval=1, sample_tokens=0, device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and runs to the forest for food".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return path


def losses(run_dir) -> list[float]:
    lines = (run_dir / rundir.METRICS).read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines]


def run(corpus, out, **kw):
    return minigpt.train(data=str(corpus), out=str(out), progress=False, **{**TINY, **kw})


def test_bf16_autocast_trains_and_tracks_float32(corpus, tmp_path):
    run(corpus, tmp_path / "fp32", max_iters=30, eval_interval=30, dtype="float32")
    run(corpus, tmp_path / "bf16", max_iters=30, eval_interval=30, dtype="bfloat16")
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert bf16 != fp32  # autocast really ran the forward pass in bf16
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.1
    assert sum(bf16[-5:]) / 5 < sum(bf16[:5]) / 5 - 0.2  # and it learns
    # master weights stay float32 in memory and on disk
    weights = load_file(str(ckpt.find_checkpoint(tmp_path / "bf16")[0] / ckpt.WEIGHTS))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_float16_with_grad_scaler_trains_and_resumes_exactly(corpus, tmp_path):
    schedule = dict(lr_decay_iters=12, eval_interval=6, dtype="float16", dropout=0.1)
    run(corpus, tmp_path / "whole", max_iters=12, **schedule)
    run(corpus, tmp_path / "split", max_iters=6, **schedule)
    minigpt.train(out=str(tmp_path / "split"), resume=True, max_iters=12, progress=False)
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert all(map(torch.isfinite, torch.tensor(whole)))
    assert whole[-1] < whole[0]
    assert split == whole  # scaler state, sampler and per-step dropout seeds resume exactly
    state = ckpt.load_trainer_state(ckpt.find_checkpoint(tmp_path / "split")[0])
    assert state["grad_scaler"]["scale"] > 1.0  # the loss scale is saved with the run


def test_compiled_training_matches_eager(corpus, tmp_path, monkeypatch):
    # torch.compile for real (Dynamo graph capture, AOT autograd), without the minutes a C++
    # inductor build takes on a small CI machine; `--compile` in production uses the default backend
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="aot_eager"))
    run(corpus, tmp_path / "eager", max_iters=3, eval_interval=3)
    summary = run(corpus, tmp_path / "compiled", max_iters=3, eval_interval=3, compile=True)
    assert summary["step"] == 3
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)
    # the checkpoint holds the plain model's names, loadable without torch.compile
    engine = minigpt.load(tmp_path / "compiled")
    assert len(engine.generate(max_new_tokens=5, seed=0)) > 0


def test_sampling_in_reduced_precision(corpus, tmp_path):
    run(corpus, tmp_path / "r", max_iters=4, eval_interval=4)
    fp32 = minigpt.load(tmp_path / "r", dtype="float32")
    bf16 = minigpt.load(tmp_path / "r", dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype is torch.bfloat16
    assert len(bf16.generate("the ", max_new_tokens=20, seed=1)) > 0
    assert fp32.generate("the ", max_new_tokens=20, temperature=0) == \
        minigpt.load(tmp_path / "r").generate("the ", max_new_tokens=20, temperature=0)  # auto on CPU


def test_unknown_dtype_is_a_one_line_error(corpus, tmp_path):
    with pytest.raises(minigpt.MiniGPTError, match="dtype must be one of auto, float32, bfloat16, float16"):
        run(corpus, tmp_path / "x", max_iters=1, dtype="half")
