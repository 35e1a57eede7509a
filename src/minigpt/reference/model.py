"""The NumPy reference GPT: forward, hand-written backward, gradient clipping and AdamW.

This module owns the maths of training without autograd. It computes exactly what
`minigpt.model.GPT` computes (GPT-2 layout: wte + learned wpe, pre-norm blocks, causal multi-head
attention, tanh-GELU MLP, ln_f, lm_head tied to wte) and then derives every parameter's gradient
layer by layer, so a reader can check each formula against `docs/backprop.md`, and the tests can
check each number against torch autograd.

It deliberately imports no torch: the point is that nothing here is done for us. Parameters are a
plain dict of arrays keyed by the torch state_dict names (`wte.weight`, `h.0.attn.c_attn.weight`,
...; Linear weights in torch's (out, in) layout), without `lm_head.weight` because the head is
tied to `wte.weight`. float32 and float64 both work: every array follows the parameters' dtype.

Not supported: dropout (the reference is deterministic; dropout > 0 raises ConfigError). Models
with bias=False are supported: the bias keys are simply absent, as in torch's state_dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import ARCHS, ModelConfig
from ..errors import ConfigError

Params = dict[str, np.ndarray]

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which model.py uses
GELU_K = math.sqrt(2.0 / math.pi)  # tanh-GELU constant: gelu(x) = x/2 (1 + tanh(K (x + A x^3)))
GELU_A = 0.044715
ADAM_EPS = 1e-8  # torch.optim.AdamW's default eps, which the torch backend keeps


def check_supported(cfg: ModelConfig) -> None:
    """Raise ConfigError (one line) for architectures the reference cannot reproduce exactly."""
    cfg.validate()
    if cfg.dropout != 0.0:
        raise ConfigError(
            f"the reference backend does not implement dropout (got dropout={cfg.dropout}); "
            "use --dropout 0 or --backend torch"
        )
    other = [f"{k.replace('_', '-')} {getattr(cfg, k)}" for k, v in ARCHS["gpt2"].items()
             # (order and weights: moot without QK-norm, which is refused itself)
             if k not in ("bias", "qk_norm_order", "qk_norm_weight") and getattr(cfg, k) != v]
    if other:
        raise ConfigError(
            f"the reference backend implements the GPT-2 layout only (got {', '.join(other)}); "
            "use --arch gpt2 or --backend torch"
        )


# ----------------------------------------------------------------------------------------------
# Parameters


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in torch's state_dict order (minus the tied lm_head)."""
    C, V = cfg.n_embd, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, C), "wpe.weight": (cfg.block_size, C)}

    def add(name: str, weight: tuple[int, ...], bias: int) -> None:
        shapes[f"{name}.weight"] = weight
        if cfg.bias:
            shapes[f"{name}.bias"] = (bias,)

    for i in range(cfg.n_layer):
        p = f"h.{i}."
        add(p + "ln_1", (C,), C)
        add(p + "attn.c_attn", (3 * C, C), 3 * C)
        add(p + "attn.c_proj", (C, C), C)
        add(p + "ln_2", (C,), C)
        add(p + "mlp.c_fc", (cfg.mlp_hidden, C), cfg.mlp_hidden)
        add(p + "mlp.c_proj", (C, cfg.mlp_hidden), C)
    add("ln_f", (C,), C)
    return shapes


def init_params(cfg: ModelConfig, seed: int = 0, dtype: np.dtype | type = np.float32) -> Params:
    """GPT-2 init, as GPT.init_weights: N(0, 0.02); residual projections (c_proj) scaled by
    1/sqrt(2 n_layer) so the residual stream's variance does not grow with depth; LayerNorm gain 1,
    biases 0. (Same distribution as the torch backend, not the same random numbers.)"""
    check_supported(cfg)
    rng = np.random.default_rng(seed)
    params: Params = {}
    for name, shape in param_shapes(cfg).items():
        if len(shape) < 2:
            fill = 0.0 if name.endswith("bias") else 1.0
            params[name] = np.full(shape, fill, dtype=dtype)
        else:
            std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
            params[name] = rng.normal(0.0, std, size=shape).astype(dtype)
    return params


def params_from_state_dict(
    state: Mapping[str, Any], cfg: ModelConfig, dtype: np.dtype | type | None = None
) -> Params:
    """Take a torch-backend state_dict (arrays or anything np.asarray accepts) as reference params.

    `lm_head.weight` is dropped when present (it is the same matrix as `wte.weight`); any other
    missing, extra or mis-shaped key is a ConfigError naming it.
    """
    shapes = param_shapes(cfg)
    extra = sorted(set(state) - set(shapes) - {"lm_head.weight"})
    missing = sorted(set(shapes) - set(state))
    if extra or missing:
        raise ConfigError(
            f"state_dict does not match the model: missing {missing}, unexpected {extra}"
        )
    params: Params = {}
    for name, shape in shapes.items():
        a = np.asarray(state[name])
        if a.shape != shape:
            raise ConfigError(f"{name} has shape {a.shape}, the model needs {shape}")
        params[name] = np.array(a, dtype=dtype or a.dtype)  # a copy: training mutates in place
    return params


def params_to_state_dict(params: Params) -> dict[str, np.ndarray]:
    """Reference params as a torch-backend state_dict, with the tied `lm_head.weight` restored."""
    state = {k: np.ascontiguousarray(v) for k, v in params.items()}
    state["lm_head.weight"] = state["wte.weight"]
    return state


def num_params(params: Params) -> int:
    return int(sum(p.size for p in params.values()))


# ----------------------------------------------------------------------------------------------
# Layers: each forward returns its output and what its backward needs.


def _linear(x: np.ndarray, params: Params, name: str) -> np.ndarray:
    """y = x W^T + b, with W in torch's (out, in) layout."""
    y = x @ params[f"{name}.weight"].T
    b = params.get(f"{name}.bias")
    return y + b if b is not None else y


def _linear_backward(
    dy: np.ndarray, x: np.ndarray, params: Params, name: str, grads: Params
) -> np.ndarray:
    """y = x W^T + b  =>  dW = dy^T x (summed over every leading axis), db = sum dy, dx = dy W."""
    W = params[f"{name}.weight"]
    dy2 = dy.reshape(-1, dy.shape[-1])
    grads[f"{name}.weight"] = dy2.T @ x.reshape(-1, x.shape[-1])
    if f"{name}.bias" in params:
        grads[f"{name}.bias"] = dy2.sum(axis=0)
    return dy @ W


def _layernorm(x: np.ndarray, params: Params, name: str) -> tuple[np.ndarray, tuple]:
    """y = xhat * g + b with xhat = (x - mean) / sqrt(var + eps); var is the biased variance."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + x.dtype.type(LN_EPS))
    xhat = xc * rstd
    y = xhat * params[f"{name}.weight"]
    b = params.get(f"{name}.bias")
    if b is not None:
        y = y + b
    return y, (xhat, rstd)


def _layernorm_backward(
    dy: np.ndarray, cache: tuple, params: Params, name: str, grads: Params
) -> np.ndarray:
    """dg = sum(dy * xhat), db = sum(dy); with dxhat = dy * g,
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   (means over the C features).
    The two subtracted means are the gradient flowing back through the mean and the variance."""
    xhat, rstd = cache
    C = xhat.shape[-1]
    grads[f"{name}.weight"] = (dy * xhat).reshape(-1, C).sum(axis=0)
    if f"{name}.bias" in params:
        grads[f"{name}.bias"] = dy.reshape(-1, C).sum(axis=0)
    dxhat = dy * params[f"{name}.weight"]
    return rstd * (
        dxhat
        - dxhat.mean(axis=-1, keepdims=True)
        - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )


def _gelu(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GPT-2's tanh approximation: gelu(x) = x/2 (1 + tanh(K (x + A x^3))). Keeps tanh for backward."""
    k, a = x.dtype.type(GELU_K), x.dtype.type(GELU_A)
    t = np.tanh(k * (x + a * x * x * x))
    return 0.5 * x * (1.0 + t), t


def _gelu_backward(dy: np.ndarray, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """d gelu/dx = (1 + t)/2 + x/2 (1 - t^2) K (1 + 3 A x^2), with t = tanh(K (x + A x^3))."""
    k, a = x.dtype.type(GELU_K), x.dtype.type(GELU_A)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * a * x * x))


def _attention(
    x: np.ndarray, params: Params, name: str, n_head: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Causal multi-head self-attention: qkv = c_attn(x); per head P = softmax(q k^T / sqrt(d) +
    causal mask); y = P v; heads concatenated and projected by c_proj."""
    B, T, C = x.shape
    d = C // n_head
    qkv = _linear(x, params, f"{name}.c_attn")  # (B, T, 3C): q, k, v in that order

    def heads(a: np.ndarray) -> np.ndarray:  # (B, T, C) -> (B, n_head, T, d)
        return a.reshape(B, T, n_head, d).transpose(0, 2, 1, 3)

    q, k, v = (heads(a) for a in np.split(qkv, 3, axis=-1))
    scale = x.dtype.type(1.0 / math.sqrt(d))
    s = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B, nh, T, T) attention scores
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # key j > query i: not allowed to look
    s = np.where(future, -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)  # softmax is shift-invariant; this keeps exp finite
    e = np.exp(s)
    P = e / e.sum(axis=-1, keepdims=True)
    yh = P @ v  # (B, nh, T, d)
    y = yh.transpose(0, 2, 1, 3).reshape(B, T, C)  # re-assemble heads
    out = _linear(y, params, f"{name}.c_proj")
    return out, {"x": x, "q": q, "k": k, "v": v, "P": P, "y": y}


def _attention_backward(
    dout: np.ndarray, cache: dict[str, np.ndarray], params: Params, name: str, grads: Params
) -> np.ndarray:
    x, q, k, v, P, y = (cache[n] for n in ("x", "q", "k", "v", "P", "y"))
    B, nh, T, d = q.shape
    C = nh * d
    # out = c_proj(y)
    dy = _linear_backward(dout, y, params, f"{name}.c_proj", grads)
    dyh = dy.reshape(B, T, nh, d).transpose(0, 2, 1, 3)  # split heads, as the forward merged them
    # yh = P v  =>  dP = dyh v^T,  dv = P^T dyh
    dP = dyh @ v.transpose(0, 1, 3, 2)
    dv = P.transpose(0, 1, 3, 2) @ dyh
    # P = softmax(s) row-wise  =>  ds = P * (dP - sum_j(dP * P)). Masked entries have P = 0, so
    # their ds is 0 too: no gradient reaches the future, and the -inf mask needs no special case.
    ds = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    ds *= x.dtype.type(1.0 / math.sqrt(d))  # s = (q k^T) / sqrt(d)
    # s = q k^T  =>  dq = ds k,  dk = ds^T q
    dq = ds @ k
    dk = ds.transpose(0, 1, 3, 2) @ q

    def merge(a: np.ndarray) -> np.ndarray:  # (B, nh, T, d) -> (B, T, C)
        return a.transpose(0, 2, 1, 3).reshape(B, T, C)

    dqkv = np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)  # undo the split
    return _linear_backward(dqkv, x, params, f"{name}.c_attn", grads)


# ----------------------------------------------------------------------------------------------
# The whole model


@dataclass
class Cache:
    """Activations kept by `forward` for `backward` (one dict per block plus the ends)."""

    idx: np.ndarray
    targets: np.ndarray | None
    blocks: list[dict[str, Any]] = field(default_factory=list)
    ln_f: tuple = ()
    ln_f_out: np.ndarray | None = None
    probs: np.ndarray | None = None  # softmax(logits), (B*T, V)


def forward(
    params: Params, cfg: ModelConfig, idx: np.ndarray, targets: np.ndarray | None = None
) -> tuple[np.ndarray, float | None, Cache]:
    """idx (B, T) token ids -> (logits (B, T, V), mean cross-entropy or None, cache for backward)."""
    check_supported(cfg)
    idx = np.asarray(idx)
    B, T = idx.shape
    if T > cfg.block_size:
        raise ValueError(f"sequence of {T} exceeds block_size {cfg.block_size}")
    wte = params["wte.weight"]
    x = wte[idx] + params["wpe.weight"][:T]  # (B, T, C): token + position embeddings
    cache = Cache(idx=idx, targets=None if targets is None else np.asarray(targets))
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        # x = x + attn(ln_1(x))
        a_in, ln1 = _layernorm(x, params, p + "ln_1")
        a_out, att = _attention(a_in, params, p + "attn", cfg.n_head)
        x = x + a_out
        # x = x + mlp(ln_2(x)) with mlp = c_proj(gelu(c_fc(.)))
        m_in, ln2 = _layernorm(x, params, p + "ln_2")
        h = _linear(m_in, params, p + "mlp.c_fc")
        g, t = _gelu(h)
        x = x + _linear(g, params, p + "mlp.c_proj")
        cache.blocks.append(
            {"ln1": ln1, "att": att, "ln2": ln2, "m_in": m_in, "h": h, "t": t, "g": g}
        )
    xf, cache.ln_f = _layernorm(x, params, "ln_f")
    cache.ln_f_out = xf
    logits = xf @ wte.T  # tied head: un-embed with the embedding matrix, no bias
    if targets is None:
        return logits, None, cache
    # Mean cross-entropy through log-softmax; subtracting the row max keeps exp from overflowing.
    z = logits.reshape(B * T, -1)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    sum_e = e.sum(axis=-1, keepdims=True)
    tflat = cache.targets.reshape(-1)
    logp_target = z[np.arange(B * T), tflat] - np.log(sum_e[:, 0])
    cache.probs = e / sum_e
    return logits, float(-logp_target.mean()), cache


def backward(params: Params, cfg: ModelConfig, cache: Cache) -> Params:
    """Gradient of the mean cross-entropy w.r.t. every parameter (same keys, shapes and dtype)."""
    if cache.probs is None or cache.targets is None:
        raise ValueError("backward needs a forward pass that was given targets")
    grads: Params = {}
    B, T = cache.idx.shape
    N = B * T
    # loss = -1/N sum_n log softmax(z_n)[y_n]  =>  dz = (softmax(z) - onehot(y)) / N
    dz = cache.probs.copy()
    dz[np.arange(N), cache.targets.reshape(-1)] -= 1.0
    dz /= N
    xf = cache.ln_f_out.reshape(N, -1)
    # logits = xf wte^T  =>  dxf = dz wte, and wte's first gradient term is dz^T xf (the head's use)
    dwte = dz.T @ xf
    dxf = (dz @ params["wte.weight"]).reshape(B, T, -1)
    dx = _layernorm_backward(dxf, cache.ln_f, params, "ln_f", grads)
    for i in reversed(range(cfg.n_layer)):
        p, c = f"h.{i}.", cache.blocks[i]
        # x_out = x_mid + c_proj(gelu(c_fc(ln_2(x_mid)))): the residual passes dx straight through,
        # and the branch adds its own gradient to it.
        dg = _linear_backward(dx, c["g"], params, p + "mlp.c_proj", grads)
        dh = _gelu_backward(dg, c["h"], c["t"])
        dm_in = _linear_backward(dh, c["m_in"], params, p + "mlp.c_fc", grads)
        dx = dx + _layernorm_backward(dm_in, c["ln2"], params, p + "ln_2", grads)
        # x_mid = x_in + attn(ln_1(x_in)): same pattern
        da_in = _attention_backward(dx, c["att"], params, p + "attn", grads)
        dx = dx + _layernorm_backward(da_in, c["ln1"], params, p + "ln_1", grads)
    # x0 = wte[idx] + wpe[:T]: each row of wte gets the sum of dx over every place its token
    # appears (np.add.at accumulates repeated indices; fancy-index += would drop repeats), and is
    # added to the head's term: a tied weight's gradient is the sum over its uses.
    np.add.at(dwte, cache.idx.reshape(-1), dx.reshape(N, -1))
    grads["wte.weight"] = dwte
    dwpe = np.zeros_like(params["wpe.weight"])
    dwpe[:T] = dx.sum(axis=0)  # positions >= T were not used: zero gradient, as in torch
    grads["wpe.weight"] = dwpe
    return {k: grads[k] for k in params}  # the params' order, so iteration matches torch's


def loss_and_grads(
    params: Params, cfg: ModelConfig, idx: np.ndarray, targets: np.ndarray
) -> tuple[float, Params]:
    """One forward + backward: (mean cross-entropy, gradients)."""
    _, loss, cache = forward(params, cfg, idx, targets)
    assert loss is not None
    return loss, backward(params, cfg, cache)


# ----------------------------------------------------------------------------------------------
# Optimisation


def clip_grad_norm(grads: Params, max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most max_norm (as torch's
    clip_grad_norm_: coefficient max_norm / (norm + 1e-6), never above 1). Returns the norm before
    clipping; max_norm <= 0 only measures."""
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    if max_norm > 0 and math.isfinite(total):  # a non-finite step is skipped, not scaled
        coef = min(max_norm / (total + 1e-6), 1.0)
        if coef < 1.0:
            for g in grads.values():
                g *= g.dtype.type(coef)
    return total


def decays(param: np.ndarray) -> bool:
    """Weight decay applies to matrices (embeddings, Linear weights), not to biases or LN gains:
    the torch backend's decay/no-decay split is dim >= 2."""
    return param.ndim >= 2


@dataclass
class AdamState:
    """First and second moment estimates per parameter, and the number of steps taken."""

    m: Params
    v: Params
    step: int = 0

    @classmethod
    def zeros_like(cls, params: Params) -> AdamState:
        return cls(
            m={k: np.zeros_like(p) for k, p in params.items()},
            v={k: np.zeros_like(p) for k, p in params.items()},
        )


def adam_step(
    params: Params,
    grads: Params,
    state: AdamState,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 0.0,
    eps: float = ADAM_EPS,
) -> None:
    """One AdamW update in place, in torch.optim.AdamW's order of operations:

    p <- p (1 - lr wd)                          decoupled decay (matrices only, see `decays`)
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    state.step += 1
    t = state.step
    bc1 = 1.0 - beta1**t  # bias corrections: m and v start at 0 and underestimate early on
    bc2_sqrt = math.sqrt(1.0 - beta2**t)
    step_size = lr / bc1
    for name, p in params.items():
        g = grads[name]
        m, v = state.m[name], state.v[name]
        dt = p.dtype.type
        if weight_decay and decays(p):
            p *= dt(1.0 - lr * weight_decay)
        m *= dt(beta1)
        m += dt(1.0 - beta1) * g
        v *= dt(beta2)
        v += dt(1.0 - beta2) * g * g
        denom = np.sqrt(v) / dt(bc2_sqrt) + dt(eps)
        p -= dt(step_size) * (m / denom)
