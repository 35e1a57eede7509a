"""The GPT: token embeddings, pre-norm transformer blocks, LM head; one class for every layout.

ModelConfig's switches pick the layout. `arch="gpt2"` is GPT-2's: learned position embeddings
(wpe), LayerNorm, tanh-GELU, biases, LM head tied to wte. `arch="modern"`: rotary position
embeddings, ReLU^2 MLP, QK-norm (queries and keys normalised per head with the model's norm, before
the rotary rotation: qk_norm_order before_rope; after_rope, the order of runs made before the
switch existed, normalises the rotated ones). Parameter names follow GPT-2 in every
layout (wte, wpe, h, ln_f, lm_head; c_attn, c_proj, c_fc) so checkpoints read like the papers and
other tools; a layout only adds or drops tensors, it never renames one. `forward` returns
(logits, loss); loss is None without targets. `forward(..., return_attention=True)` also returns
every head's attention weights, computed as an explicit softmax(QK^T / sqrt(d) + causal mask) that
only this option pays for: training and generation keep the fused scaled_dot_product_attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import KVCache

ROPE_BASE = 10000.0


def make_dropout(p: float) -> nn.Module:
    """Dropout, or nothing at p = 0: an eval-mode Dropout still costs an operation per call, which
    shows in per-token decoding."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=1e-6)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


def rotary_tables(block_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (block_size, head_dim / 2): rotation angle of each position and pair."""
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1[i], x2[i]) of the two halves of each head by each position's angle.

    x: (B, T, ..., head_dim); cos, sin broadcast against x's halves, (T, 1, ..., head_dim / 2).
    Dot products of rotated queries and keys depend only on the distance between their positions.
    """
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out if out.dtype == x.dtype else out.to(x.dtype)  # fp32 tables under autocast


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qk_norm = cfg.norm if cfg.qk_norm else None
        self.norm_first = bool(cfg.qk_norm) and cfg.qk_norm_order == "before_rope"
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in that order
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = make_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                layer: int = 0, kv_cache: KVCache | None = None,
                attention: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Self-attention of x (B, T, C); given a list, appends its weights (B, n_head, T, T)."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        # split, not indexing: its backward is one concatenation instead of zero-filled copies
        qk, v = qkv.split((2, 1), dim=2)  # (B, T, 2, n_head, head_dim), (B, T, 1, n_head, head_dim)
        if self.norm_first:  # qk_norm_order before_rope: a norm does not commute with a rotation
            qk = self._qk_norm(qk)
        if rope is not None:  # queries and keys together: one set of operations instead of two
            qk = apply_rotary(qk, *rope)
        if not self.norm_first:
            qk = self._qk_norm(qk)
        q, k = qk.unbind(2)
        # (B, T, n_head, head_dim) -> (B, n_head, T, head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)
        mask, causal = None, True
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(layer, k, v)  # (B, n_head, start + T, head_dim)
            if start > 0:
                causal = False
                if T > 1:  # new query i may see cached keys and new keys up to itself
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        if attention is not None:  # same q, k, v (rotary, QK-norm) as below, weights kept
            y = self._explicit_attention(q, k, v, attention)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal,
                dropout_p=self.dropout if self.training else 0.0,
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return self.resid_drop(self.c_proj(y))

    def _qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """Queries and keys normalised per head, no weights (bounded attention logits: higher
        learning rates stay stable); unchanged without QK-norm."""
        if self.qk_norm == "rmsnorm":
            return F.rms_norm(qk, (qk.size(-1),))
        if self.qk_norm == "layernorm":
            return F.layer_norm(qk, (qk.size(-1),))
        return qk

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            attention: list[torch.Tensor]) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim), future masked) @ v, written out so the weights can be
        kept; what scaled_dot_product_attention computes with is_causal=True."""
        T = q.size(-2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, n_head, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        weights = scores.float().masked_fill(future, float("-inf")).softmax(dim=-1)
        attention.append(weights)
        return F.dropout(weights, self.dropout, self.training).to(v.dtype) @ v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.activation = cfg.activation
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = make_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "relu2":
            h = F.relu(h).square()
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.drop(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, layer: int = 0, kv_cache: KVCache | None = None,
                attention: list[torch.Tensor] | None = None):
        x = x + self.attn(self.ln_1(x), rope, layer, kv_cache, attention)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_emb == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:  # rotary tables are derived, not learnt: buffers outside the state_dict
            cos, sin = rotary_tables(cfg.block_size, cfg.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = make_dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix embeds and un-embeds
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 * n_layer).

        An untied head starts at zero, so the first logits are uniform and the first steps do not
        spend themselves undoing a random read-out.
        """
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif name == "lm_head.weight":  # reached only when untied (tied tensors appear once)
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """idx (B, T) token ids -> logits (B, T, vocab); loss is mean cross-entropy vs targets.

        With return_attention, -> (logits, loss, attention (n_layer, B, n_head, T, T)): row i of a
        head's map is how token i weighs tokens 0..i (each row sums to 1). Not with a KV cache.
        """
        B, T = idx.shape
        if return_attention and kv_cache is not None:
            raise ValueError("return_attention reads a whole sequence; it takes no kv_cache")
        attention: list[torch.Tensor] | None = [] if return_attention else None
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} exceeds block_size {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.wpe.weight[start : start + T]  # a slice: no index tensor, cheap backward
        else:  # positions come from the cache: a decoded token is rotated by its true position
            rope = (self.rope_cos[start : start + T, None, None],  # (T, 1, 1, head_dim / 2)
                    self.rope_sin[start : start + T, None, None])
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, rope, i, kv_cache, attention)
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        if attention is not None:
            return logits, loss, torch.stack(attention)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_emb == "learned":
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 6N plus attention), as in the PaLM paper."""
        c = self.config
        n = self.num_params(non_embedding=True)
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size
