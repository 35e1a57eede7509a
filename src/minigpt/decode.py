"""One decoding step with the framework overhead taken out: GPT.forward's arithmetic for one new
token per stream, at about half its cost on a CPU.

Why a second path: decoding a token of the `small` model through GPT.forward runs ~150 tensor
operations and ~50 module calls, and at several microseconds of Python and dispatch overhead each,
that overhead (1.2 ms per token), not arithmetic (the matrix products take under 0.1 ms), sets the
pace. `DecodeStep` calls the same kernels on the model's own parameter tensors (so it always sees
the current weights), skips the module calls and the reshapes a single token does not need, and
looks up its position's rotary rows instead of slicing tables. Prompts and cache rebuilds still go
through GPT.forward. Its logits equal GPT.forward's to float32 rounding, for every layout
(tests/test_decode.py).

`DecodeStep.rows` is the same step for a continuous batch (`batching.py`): every row at its own
position, so learned and rotary positions are looked up per row and each row's query is masked to
its own keys. When every row is at the same position it needs no mask and runs exactly the
arithmetic of `__call__`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .model import GPT


class DecodeStep:
    def __init__(self, model: GPT):
        cfg = self.cfg = model.config
        self.model = model
        self.head_dim = cfg.n_embd // cfg.n_head
        self.layers = [
            (b.ln_1.weight, getattr(b.ln_1, "bias", None), b.attn.c_attn.weight, b.attn.c_attn.bias,
             b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, getattr(b.ln_2, "bias", None),
             b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias)
            for b in model.h
        ]
        self.rope = cfg.pos_emb == "rope"
        if self.rope:
            # x * cos + swap_halves(x) * sin, with sin's first half negated, is apply_rotary's
            # rotation of the pair (x1[i], x2[i]) by each position's angle
            self.cos = torch.cat((model.rope_cos, model.rope_cos), dim=-1)  # (block_size, head_dim)
            self.sin = torch.cat((-model.rope_sin, model.rope_sin), dim=-1)
        rms = cfg.norm == "rmsnorm"
        self.norm = _rms_norm if rms else _layer_norm
        self.qk_norm = (_rms_norm if rms else _layer_norm) if cfg.qk_norm else None
        self.qk_norm_first = self.qk_norm is not None and cfg.qk_norm_order == "before_rope"
        self.gelu = None if cfg.activation == "relu2" else (
            "none" if cfg.activation == "gelu" else "tanh")

    def _rotate_and_norm(self, qk: torch.Tensor, cos: torch.Tensor | None,
                         sin: torch.Tensor | None) -> torch.Tensor:
        """Queries and keys (B, 2, H, 1, D) -> rotated and QK-normed in the layout's order, as
        GPT.forward does; one place for the single-stream step and the per-row step."""
        if self.qk_norm_first:
            qk = self.qk_norm(qk)
        if self.rope:
            rotated = qk * cos + qk.roll(self.head_dim // 2, dims=-1) * sin
            qk = rotated if rotated.dtype == qk.dtype else rotated.to(qk.dtype)
        if self.qk_norm and not self.qk_norm_first:
            qk = self.qk_norm(qk)
        return qk

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B,) at position cache.pos -> logits (B, vocab); the cache advances by one."""
        cfg, m = self.cfg, self.model
        B, C, H, D = tokens.size(0), cfg.n_embd, cfg.n_head, self.head_dim
        pos = cache.pos
        if pos >= cfg.block_size:
            raise ValueError(f"sequence of {pos + 1} exceeds block_size {cfg.block_size}")
        x = m.wte.weight[tokens]  # (B, C)
        cos = sin = None
        if self.rope:
            cos, sin = self.cos[pos], self.sin[pos]
        else:
            x = x + m.wpe.weight[pos]
        for i, (w1, b1, wa, ba, wp, bp, w2, b2, wf, bf, wo, bo) in enumerate(self.layers):
            qkv = F.linear(self.norm(x, w1, b1), wa, ba).view(B, 3, H, 1, D)
            q, k = self._rotate_and_norm(qkv.narrow(1, 0, 2), cos, sin).unbind(1)
            k, v = cache.update(i, k, qkv.select(1, 2))  # (B, H, pos + 1, D)
            y = F.scaled_dot_product_attention(q, k, v)  # one query: it sees every key
            x = x + F.linear(y.view(B, C), wp, bp)
            h = F.linear(self.norm(x, w2, b2), wf, bf)
            h = torch.relu_(h).square_() if self.gelu is None else F.gelu(h, approximate=self.gelu)
            x = x + F.linear(h, wo, bo)
        cache.advance(1)
        return F.linear(self.norm(x, m.ln_f.weight, getattr(m.ln_f, "bias", None)), m.lm_head.weight)


    def rows(self, tokens: torch.Tensor, positions: list[int], cache: KVCache) -> torch.Tensor:
        """tokens (b,) for cache rows 0..b-1, row r at position positions[r] -> logits (b, vocab).

        The cache does not track per-row lengths: the caller advances its own (`batching`)."""
        cfg, m = self.cfg, self.model
        B, C, H, D = tokens.size(0), cfg.n_embd, cfg.n_head, self.head_dim
        top = max(positions)
        if top >= cfg.block_size:
            raise ValueError(f"sequence of {top + 1} exceeds block_size {cfg.block_size}")
        pos = torch.tensor(positions, device=tokens.device)
        index = pos.view(B, 1, 1, 1).expand(B, H, 1, D)
        # rows shorter than the longest one must not see the stale keys past their own length
        mask = None
        if min(positions) != top:
            keys = torch.arange(top + 1, device=tokens.device)
            mask = (keys <= pos.view(B, 1)).view(B, 1, 1, top + 1)
        x = m.wte.weight[tokens]  # (B, C)
        cos = sin = None
        if self.rope:
            cos, sin = self.cos[pos].view(B, 1, 1, 1, D), self.sin[pos].view(B, 1, 1, 1, D)
        else:
            x = x + m.wpe.weight[pos]
        for i, (w1, b1, wa, ba, wp, bp, w2, b2, wf, bf, wo, bo) in enumerate(self.layers):
            qkv = F.linear(self.norm(x, w1, b1), wa, ba).view(B, 3, H, 1, D)
            q, k = self._rotate_and_norm(qkv.narrow(1, 0, 2), cos, sin).unbind(1)
            k, v = cache.update_rows(i, k, qkv.select(1, 2), index, top + 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + F.linear(y.view(B, C), wp, bp)
            h = F.linear(self.norm(x, w2, b2), wf, bf)
            h = torch.relu_(h).square_() if self.gelu is None else F.gelu(h, approximate=self.gelu)
            x = x + F.linear(h, wo, bo)
        return F.linear(self.norm(x, m.ln_f.weight, getattr(m.ln_f, "bias", None)), m.lm_head.weight)


def prefill(model: GPT, tokens: torch.Tensor, cache: KVCache, logits: bool = True
            ) -> torch.Tensor | None:
    """GPT.forward's arithmetic for a prompt (or a chunk of one) continuing at cache.pos, with
    the head applied to the last position only (the only one anybody samples from), or not at
    all (`logits=False`: a cache rebuild). tokens (B, T) -> logits (B, vocab) or None."""
    B, T = tokens.shape
    start, cfg = cache.pos, model.config
    if start + T > cfg.block_size:
        raise ValueError(f"sequence of {start + T} exceeds block_size {cfg.block_size}")
    x = model.wte(tokens)
    rope = None
    if cfg.pos_emb == "learned":
        x = x + model.wpe.weight[start : start + T]
    else:
        rope = (model.rope_cos[start : start + T, None, None],
                model.rope_sin[start : start + T, None, None])
    for i, block in enumerate(model.h):
        x = block(x, rope, i, cache)
    cache.advance(T)
    if not logits:
        return None
    return model.lm_head(model.ln_f(x[:, -1]))


# The model's norms, as functions: nn.LayerNorm's eps (1e-5) and make_norm's RMSNorm eps (1e-6); the
# QK-norm has no weights and the functional defaults, as in CausalSelfAttention.
def _layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.layer_norm(x, (x.size(-1),), weight, bias)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), weight, eps=1e-6 if weight is not None else None)
