"""model.rms_norm, the RMSNorm every layout with --norm rmsnorm (and its QK-norm) trains through,
computes what F.rms_norm computes: values and gradients within float32 rounding, the same eps
(1e-6, or torch's default for the weightless QK-norm), the same dtypes under bf16 autocast; a
portable model's training step gets the gradients F.rms_norm gives it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minigpt import model as model_mod
from minigpt.config import ModelConfig
from minigpt.model import GPT, RMS_NORM_EPS, _RMSNormCPU, rms_norm

# (x's shape, weight's shape or None, eps): the blocks' norm; the QK-norm on a permuted view of
# c_attn's output, weightless at torch's eps and at 1e-6 (gains applied after it); odd sizes
CASES = [((6, 128), (128,), RMS_NORM_EPS), ("qk", None, None), ("qk", None, RMS_NORM_EPS),
         ((3, 5, 17), (17,), RMS_NORM_EPS), ((1, 1, 8), None, None)]


def make(shape, wshape, dtype, scale=1.0):
    gen = torch.Generator().manual_seed(0)
    if shape == "qk":  # (2, B, H, T, D) as GPT._layer hands it over: not contiguous
        x = torch.randn(3, 7, 3, 2, 32, generator=gen).permute(2, 0, 3, 1, 4)[:2]
    else:
        x = torch.randn(*shape, generator=gen)
    x = (x * scale).to(dtype).requires_grad_()
    w = None
    if wshape is not None:
        w = (1 + 0.3 * torch.randn(*wshape, generator=gen)).requires_grad_()
    g = torch.randn(x.shape, generator=gen).to(dtype)
    return x, w, g


def grads(y, x, w, g):
    return torch.autograd.grad(y, [x] if w is None else [x, w], g)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    """Within `rel` of the reference's largest magnitude (elementwise relative error means
    nothing where a gradient cancels to ~0)."""
    return a.dtype == b.dtype and (a.float() - b.float()).abs().max() <= rel * b.float().abs().max()


@pytest.mark.parametrize("scale", [1.0, 1e-4])  # 1e-4: mean(x^2) ~ eps, so eps must be the same
@pytest.mark.parametrize("shape,wshape,eps", CASES)
def test_float32_values_and_gradients_match_torch(shape, wshape, eps, scale):
    x, w, g = make(shape, wshape, torch.float32, scale)
    ref = F.rms_norm(x, (x.size(-1),), w, eps)
    y = rms_norm(x, w, eps)
    assert "_RMSNormCPU" in type(y.grad_fn).__name__  # the written-out backward is what is tested
    assert close(y, ref)
    for a, b in zip(grads(y, x, w, g), grads(ref, x, w, g)):
        assert close(a, b)


@pytest.mark.parametrize("shape,wshape,eps", CASES)
def test_bfloat16_is_torchs_own(shape, wshape, eps):
    x, w, g = make(shape, wshape, torch.bfloat16)
    ref = F.rms_norm(x, (x.size(-1),), w, eps)
    y = rms_norm(x, w, eps)
    assert close(y, ref)
    for a, b in zip(grads(y, x, w, g), grads(ref, x, w, g)):
        assert close(a, b)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_autocast_dtypes_match_torch(x_dtype, weighted):
    x, w, g = make((4, 16), (16,) if weighted else None, x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.rms_norm(x, (16,), w, RMS_NORM_EPS)
        y = rms_norm(x, w, RMS_NORM_EPS)
    assert close(y, ref)
    for a, b in zip(grads(y, x, w, g), grads(ref, x, w, g)):
        assert close(a, b)


def test_backward_is_the_derivative():
    x = torch.randn(5, 2, 12, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(12, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormCPU.apply(a, b, 1e-3), (x, w))
    assert torch.autograd.gradcheck(lambda a: _RMSNormCPU.apply(a, None, 1e-3), (x,))


def test_without_grad_it_is_torchs_own():
    x, w, _ = make((4, 16), (16,), torch.float32)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, w, RMS_NORM_EPS), F.rms_norm(x, (16,), w, RMS_NORM_EPS))


@pytest.mark.parametrize("arch", ["portable", "modern+rmsnorm"])
def test_a_training_step_gets_torchs_gradients(arch, monkeypatch):
    layout = dict(arch="portable") if arch == "portable" else dict(arch="modern", norm="rmsnorm")
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32, **layout))
    idx = torch.randint(0, 23, (3, 16))

    def step():
        m.zero_grad()
        logits, loss = m(idx, idx)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    loss, got = step()
    monkeypatch.setattr(model_mod, "rms_norm",
                        lambda x, w, eps: F.rms_norm(x, (x.size(-1),), w, eps))
    ref_loss, ref = step()
    assert torch.equal(loss, ref_loss)  # the forward is F.rms_norm's own arithmetic
    for name in ref:
        assert close(got[name], ref[name], 1e-5), name
