"""The NumPy reference engine against torch: gradients, AdamW, clipping, loss curves, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt.config import ModelConfig
from minigpt.errors import ConfigError
from minigpt.model import GPT
from minigpt.reference import model as R

PKG = str(Path(R.__file__).resolve().parent)  # the src/minigpt this test imports
TINY = dict(vocab_size=13, block_size=6, n_layer=2, n_head=2, n_embd=8)


def torch_model(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> GPT:
    """A GPT whose LayerNorm gains and biases are perturbed away from 1 and 0, so their gradients
    and their effect on every other gradient are actually exercised."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def as_params(model: GPT, cfg: ModelConfig) -> R.Params:
    return R.params_from_state_dict(
        {k: v.detach().numpy() for k, v in model.state_dict().items()}, cfg
    )


def batch(cfg: ModelConfig, B: int = 3, T: int | None = None, seed: int = 1):
    rng = np.random.default_rng(seed)
    T = T or cfg.block_size
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def test_reference_runs_without_torch():
    """Importing and using the reference loads no torch: every gradient here is written by hand.
    The package is lazy, so importing it through `minigpt` costs nothing either."""
    code = """
import sys
from minigpt.reference import model as R
from minigpt.config import ModelConfig
cfg = ModelConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
loss, grads = R.loss_and_grads(R.init_params(cfg), cfg, [[1, 2, 3]], [[2, 3, 4]])
print(len(grads), "torch" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(PKG).parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["16", "False"], out.stderr


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_autograd_float64(bias):
    cfg = ModelConfig(**TINY, bias=bias)
    model = torch_model(cfg, torch.float64)
    params = as_params(model, cfg)
    idx, tgt = batch(cfg, T=5)  # T < block_size: wpe rows past T must get exactly zero gradient
    idx[0, :3] = 4  # a token repeated in the batch: its wte row must accumulate every occurrence
    loss, grads = R.loss_and_grads(params, cfg, idx, tgt)
    _, tloss = model(torch.from_numpy(idx), torch.from_numpy(tgt))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    assert set(grads) == set(torch_grads)  # every parameter, no lm_head duplicate
    for name, g in torch_grads.items():
        assert grads[name].dtype == np.float64
        assert grads[name].shape == g.shape, name
        assert rel_err(grads[name], g) <= 1e-4, name
    assert not grads["wpe.weight"][5:].any()


def test_gradients_match_autograd_float32():
    cfg = ModelConfig(**TINY)
    model = torch_model(cfg, torch.float32)
    params = as_params(model, cfg)
    idx, tgt = batch(cfg)
    loss, grads = R.loss_and_grads(params, cfg, idx, tgt)
    _, tloss = model(torch.from_numpy(idx), torch.from_numpy(tgt))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert grads[name].dtype == np.float32
        assert rel_err(grads[name], p.grad.numpy()) <= 1e-4, name


def test_gradients_match_finite_differences():
    cfg = ModelConfig(**TINY)
    params = as_params(torch_model(cfg, torch.float64), cfg)
    idx, tgt = batch(cfg)
    _, grads = R.loss_and_grads(params, cfg, idx, tgt)
    rng = np.random.default_rng(2)
    h = 1e-6
    for name in (
        "wte.weight",
        "wpe.weight",
        "h.0.ln_1.weight",
        "h.0.attn.c_attn.weight",
        "h.1.attn.c_attn.bias",
        "h.1.mlp.c_fc.weight",
        "h.0.mlp.c_proj.bias",
        "ln_f.bias",
    ):
        p = params[name]
        for _ in range(2):
            i = tuple(int(rng.integers(0, s)) for s in p.shape)
            if name == "wte.weight":  # a token that occurs, so both tied uses contribute
                i = (int(idx[0, 0]), i[1])
            old = p[i]
            p[i] = old + h
            up = R.forward(params, cfg, idx, tgt)[1]
            p[i] = old - h
            down = R.forward(params, cfg, idx, tgt)[1]
            p[i] = old
            numeric = (up - down) / (2 * h)
            assert grads[name][i] == pytest.approx(numeric, rel=1e-5, abs=1e-9), (name, i)


def test_forward_logits_match_torch():
    cfg = ModelConfig(**TINY)
    model = torch_model(cfg, torch.float32)
    idx, _ = batch(cfg)
    logits, loss, _ = R.forward(as_params(model, cfg), cfg, idx)
    assert loss is None
    with torch.no_grad():
        expected = model(torch.from_numpy(idx))[0].numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_adamw_steps_equal_torch():
    """Three steps, so bias correction's dependence on t is exercised; decay only on matrices."""
    cfg = ModelConfig(**TINY)
    model = torch_model(cfg, torch.float64)
    params = as_params(model, cfg)
    named = dict(model.named_parameters())
    decay = [p for p in named.values() if p.dim() >= 2]
    no_decay = [p for p in named.values() if p.dim() < 2]
    hp = dict(lr=0.01, beta1=0.9, beta2=0.95, weight_decay=0.1)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": hp["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=hp["lr"],
        betas=(hp["beta1"], hp["beta2"]),
    )
    state = R.AdamState.zeros_like(params)
    rng = np.random.default_rng(3)
    for _ in range(3):
        grads = {k: rng.normal(size=p.shape) for k, p in params.items()}
        for k, p in named.items():
            p.grad = torch.from_numpy(grads[k].copy())
        opt.step()
        R.adam_step(params, grads, state, **hp)
    assert state.step == 3
    for k, p in named.items():
        np.testing.assert_allclose(params[k], p.detach().numpy(), rtol=1e-12, atol=1e-15)


def test_weight_decay_only_touches_matrices():
    cfg = ModelConfig(**TINY)
    params = R.init_params(cfg, dtype=np.float64)
    before = {k: p.copy() for k, p in params.items()}
    zero = {k: np.zeros_like(p) for k, p in params.items()}
    R.adam_step(params, zero, R.AdamState.zeros_like(params), lr=0.1, weight_decay=0.5)
    for k, p in params.items():  # with zero gradients only decay moves anything
        np.testing.assert_allclose(p, before[k] * (0.95 if p.ndim >= 2 else 1.0), err_msg=k)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_equals_torch(max_norm):
    rng = np.random.default_rng(4)
    grads = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=(5,))}
    tensors = [torch.from_numpy(g.copy()).requires_grad_() for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = torch.from_numpy(g.copy())
    expected = torch.nn.utils.clip_grad_norm_(tensors, max_norm).item()
    assert R.clip_grad_norm(grads, max_norm) == pytest.approx(expected, rel=1e-12)
    for t, g in zip(tensors, grads.values(), strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-12)


def test_dropout_is_refused_with_a_clear_error():
    cfg = ModelConfig(**{**TINY, "dropout": 0.1})
    with pytest.raises(ConfigError, match="dropout"):
        R.init_params(cfg)


@pytest.mark.parametrize("layout", [dict(arch="gpt2", qk_norm=True, qk_norm_order="before_rope"),
                                    dict(arch="modern", qk_norm_order="before_rope")])
def test_qk_norm_in_either_order_is_refused(layout):
    with pytest.raises(ConfigError, match="GPT-2 layout only .*qk-norm True"):
        R.check_supported(ModelConfig(**{**TINY, **layout}))


def test_qk_norm_order_without_qk_norm_is_not_a_refusal():
    """The order of a norm that is off changes nothing: the GPT-2 layout stays the reference's."""
    R.check_supported(ModelConfig(**{**TINY, "arch": "gpt2", "qk_norm_order": "before_rope"}))
    R.check_supported(ModelConfig(**{**TINY, "arch": "gpt2", "qk_norm_weight": True}))


def test_portable_layout_is_refused_naming_its_switches():
    with pytest.raises(ConfigError, match="GPT-2 layout only \\(got pos-emb rope, norm rmsnorm, "
                                          "activation swiglu, qk-norm True\\)"):
        R.check_supported(ModelConfig(**{**TINY, "arch": "portable"}))
    with pytest.raises(ConfigError, match="activation swiglu"):
        R.check_supported(ModelConfig(**{**TINY, "arch": "gpt2", "activation": "swiglu"}))


def test_state_dict_round_trip_and_mismatch():
    cfg = ModelConfig(**TINY)
    params = R.init_params(cfg, seed=5)
    state = R.params_to_state_dict(params)
    model = GPT(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})  # strict
    assert model.lm_head.weight is model.wte.weight
    back = R.params_from_state_dict(state, cfg)
    assert all(np.array_equal(back[k], params[k]) for k in params)
    del state["h.1.mlp.c_fc.bias"]
    with pytest.raises(ConfigError, match="h.1.mlp.c_fc.bias"):
        R.params_from_state_dict(state, cfg)


# ----------------------------------------------------------------------------------------------
# The reference as a training engine (`train(backend="reference")`, `minigpt train --engine ...`)

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 30
RUN = dict(
    arch="gpt2",  # the layout and optimizer the reference implements, for both engines
    optimizer="adamw",
    n_layer=2,
    n_head=2,
    n_embd=16,
    block_size=8,
    batch_size=8,
    eval_iters=2,
    sample_tokens=0,
    warmup_iters=5,
    log_interval=1,
    lr=3e-3,
    min_lr=3e-4,
)


@pytest.fixture
def text(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS, encoding="utf-8")
    return p


def train_run(text: Path, out: Path, **kw) -> list[dict]:
    from minigpt import train

    train(data=str(text), out=str(out), progress=False, **{**RUN, **kw})
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(metrics: list[dict]) -> np.ndarray:
    return np.array([m["train_loss"] for m in metrics])


def test_reference_and_torch_engines_have_the_same_loss_curve(text, tmp_path):
    """Same seed => same initial weights and batches; the curves then agree step for step."""
    ref = train_run(text, tmp_path / "ref", backend="reference", max_iters=50, eval_interval=50)
    pt = train_run(text, tmp_path / "torch", backend="torch", max_iters=50, eval_interval=50)
    assert len(ref) == len(pt) == 50
    np.testing.assert_allclose(losses(ref), losses(pt), atol=2e-4)
    assert ref[-1]["val_loss"] == pytest.approx(pt[-1]["val_loss"], abs=2e-4)
    assert losses(ref)[-5:].mean() < losses(ref)[:5].mean() - 0.5  # it learns


@pytest.mark.parametrize("first, then", [("reference", "torch"), ("torch", "reference")])
def test_either_engine_resumes_the_others_run(text, tmp_path, first, then):
    """Optimizer moments cross engines: 4 steps + resume to 8 equals 8 uninterrupted steps (which
    fails if the AdamW state were dropped or scrambled: bias correction alone would differ)."""
    kw = dict(max_iters=8, eval_interval=4, grad_accum=2, bias=first == "torch")
    straight = train_run(text, tmp_path / "straight", backend="torch", **kw)
    train_run(text, tmp_path / "split", engine=first, **{**kw, "max_iters": 4})
    from minigpt import train

    train(out=str(tmp_path / "split"), resume=True, engine=then, max_iters=8, progress=False)
    split = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in split] == list(range(1, 9))
    np.testing.assert_allclose(losses(split), losses(straight), atol=2e-4)


def test_torch_checkpoint_loads_into_the_reference(text, tmp_path):
    from minigpt.engine import load
    from minigpt.reference.trainer import load_params

    train_run(text, tmp_path / "run", backend="torch", max_iters=6, eval_interval=3)
    mcfg, params = load_params(tmp_path / "run")
    model = load(tmp_path / "run", device="cpu").model
    idx = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(torch.from_numpy(idx))[0].numpy()
    np.testing.assert_allclose(R.forward(params, mcfg, idx)[0], expected, rtol=1e-5, atol=1e-6)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(PKG).parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "minigpt", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_trains_with_the_reference_and_the_run_samples(text, tmp_path):
    run = tmp_path / "run"
    trained = cli(
        "train",
        "--backend",
        "reference",
        "--preset",
        "tiny",
        "--data",
        str(text),
        "--out",
        str(run),
        "--max-iters",
        "30",
        "--eval-interval",
        "15",
        "--eval-iters",
        "2",
        "--sample-tokens",
        "0",
        "--quiet",
    )
    assert trained.returncode == 0, trained.stderr
    assert "step 30" in trained.stdout
    assert json.loads((run / "config.json").read_text())["train"]["backend"] == "reference"
    sampled = cli("sample", str(run), "--prompt", "All:", "--max-new-tokens", "40", "--seed", "0")
    assert sampled.returncode == 0, sampled.stderr
    # a continuation of the prompt (it may stop early: the model can sample its end-of-text token)
    assert sampled.stdout.startswith("All:") and len(sampled.stdout.strip()) > len("All:")
    from minigpt.tools.info import run_info

    assert run_info(run)["step"] == 30  # what `minigpt info` reports


def test_cli_refuses_dropout_with_one_line(text, tmp_path):
    run = tmp_path / "run"
    proc = cli(
        "train",
        "--backend",
        "reference",
        "--preset",
        "tiny",
        "--dropout",
        "0.1",
        "--data",
        str(text),
        "--out",
        str(run),
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "dropout" in proc.stderr
    assert not run.exists()  # refused before anything was written


def test_reference_refuses_a_gpu_device(text, tmp_path, capsys):
    from minigpt.cli import main

    code = main(
        [
            "train",
            "--backend",
            "reference",
            "--device",
            "cuda",
            "--data",
            str(text),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "CPU only" in err and err.count("\n") == 1
