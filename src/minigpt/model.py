"""The GPT: token embeddings, pre-norm transformer blocks, LM head; one class for every layout, and
the only place its arithmetic is written.

ModelConfig's switches pick the layout, and this file is where they are read. `arch="gpt2"` is
GPT-2's: learned position embeddings (wpe), LayerNorm, tanh-GELU, biases, LM head tied to wte.
`arch="modern"`: rotary position embeddings, ReLU^2 MLP, QK-norm (queries and keys normalised per
head with the model's norm, before the rotary rotation: qk_norm_order before_rope; after_rope, the
order of runs made before the switch existed, normalises the rotated ones). `arch="portable"`:
Qwen3's layout, RMSNorm, SwiGLU MLP, no biases, and a QK-norm with learnt per-dimension gains
(attn.ln_q, attn.ln_k; qk_norm_weight) before rotary. `arch="stablelm"`, the default recipe's:
the portable layout with LayerNorm (without biases). Parameter names follow
GPT-2 in every layout (wte, wpe, h, ln_f, lm_head; c_attn, c_proj, c_fc) so checkpoints read like
the papers and other tools; a layout only adds or drops tensors, it never renames one.

One `forward` serves every use (litgpt's `forward(idx, input_pos)` is the model of it):
- training: whole sequences, no cache, causal attention; `(logits, loss)` against targets;
- prefill: a prompt (or a chunk of one) written into a preallocated `KVCache` at position `pos`,
  with `last_only=True` the LM head on the last position only (the only one anybody samples);
- decode: one new token per row, each row at its own position (`pos` a list): the rows of a
  continuous batch, each masked to its own keys.
The modules only hold the parameters under their names; `_layer` computes a block through
torch.nn.functional on the block's tensors, gathered once outside training: decoding a token is a
few dozen small operations, and a module call per norm and projection (plus an attribute lookup per
weight) cost as much again (docs/speed.md).

With `lora_rank` > 0 the weights are a frozen base and each target projection adds a low-rank
adapter (lora.py): `_layer` computes it through `lora.project`; an evaluating model gathers the
weights with the adapters folded in, so decoding costs what the base's does.

`forward(..., return_attention=True)` also returns every head's attention weights, computed as an
explicit softmax(QK^T / sqrt(d) + causal mask) that only this option pays for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lora
from .config import ModelConfig
from .kv_cache import KVCache

ROPE_BASE = 10000.0
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default
RMS_NORM_EPS = 1e-6


def rotary_tables(block_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (block_size, head_dim) for `apply_rotary`: each position's angle of each
    pair of dimensions (i, i + head_dim / 2), written for both halves, sin negated in the first."""
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1[i], x2[i]) of the two halves of each head by each position's angle:
    (x1 cos - x2 sin, x2 cos + x1 sin), as x * cos + swap_halves(x) * sin with `rotary_tables`.

    x: (..., head_dim); cos, sin broadcast against it. Dot products of rotated queries and keys
    depend only on the distance between their positions.
    """
    out = x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)  # fp32 tables under autocast


def norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, rms: bool
         ) -> torch.Tensor:
    """The model's norm over the last dimension: RMSNorm (eps 1e-6) or LayerNorm (torch's eps,
    1e-5). Without weights it is the QK-norm (RMSNorm then at torch's default eps)."""
    if rms:
        return rms_norm(x, weight, RMS_NORM_EPS if weight is not None else None)
    return F.layer_norm(x, (x.size(-1),), weight, bias, LAYER_NORM_EPS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """F.rms_norm over the last dimension: x / sqrt(mean(x^2) + eps) * weight; eps None is torch's
    default, float32's machine epsilon for float32.

    Where a graph is recorded for float32 CPU tensors, the same arithmetic as an autograd Function
    with its backward written out: torch's CPU rms_norm is composite, and its recorded graph (pow,
    mean, add, rsqrt, two muls, each with its own backward) made an RMSNorm training step markedly
    dearer than a LayerNorm one (measured in docs/speed.md, benchmarks/rms_norm.py). Everywhere else
    (decoding, other dtypes, GPUs with their fused kernels) it is F.rms_norm itself.
    """
    if (x.dtype is torch.float32 and x.device.type == "cpu" and torch.is_grad_enabled()
            and (weight is None or weight.dtype is torch.float32)):
        return _RMSNormCPU.apply(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)
    return F.rms_norm(x, (x.size(-1),), weight, eps)


class _RMSNormCPU(torch.autograd.Function):
    """y = n * w, n = x * r, r = rsqrt(mean(x^2) + eps): the forward is F.rms_norm's own sequence
    of operations (the same values); the backward is dx = r * (g w - n * mean(g w n)) and dw = the
    sum of g n over the leading dimensions, from one product g n: its column sums are dw and its
    rows times w are the means (a matrix-vector product, cheaper here than another pass)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        n = x * r
        ctx.save_for_backward(n, r, weight)
        return n if weight is None else n * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        n, r, weight = ctx.saved_tensors
        d = n.size(-1)
        gn = g * n
        gw = gn.reshape(-1, d).sum(0) if weight is not None and ctx.needs_input_grad[1] else None
        gx = None
        if ctx.needs_input_grad[0]:
            if weight is None:
                m = gn.sum(-1, keepdim=True).div_(-d)  # -mean(g n)
                gx = torch.addcmul(g, n, m)
            else:
                m = (gn @ weight).unsqueeze_(-1).div_(-d)  # -mean(g w n)
                gx = (g * weight).addcmul_(n, m)
            gx.mul_(r)
        return gx, gw, None


def qk_norm(qk: torch.Tensor, gain: torch.Tensor | None, rms: bool) -> torch.Tensor:
    """Queries and keys, stacked (2, B, H, T, D), normalised per head. Without a gain: the model's
    norm without weights (RMS at torch's default eps, as runs have always been trained). With one,
    (2, 1, 1, 1, D) = q's and k's: the norm at the layers' eps, then times the gain (Qwen3's q_norm
    and k_norm compute x / sqrt(mean(x^2) + eps) * weight)."""
    if gain is None:
        return norm(qk, None, None, rms)
    if rms:
        return rms_norm(qk, None, RMS_NORM_EPS) * gain
    return F.layer_norm(qk, (qk.size(-1),), None, None, LAYER_NORM_EPS) * gain


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=RMS_NORM_EPS)
    return nn.LayerNorm(cfg.n_embd, eps=LAYER_NORM_EPS, bias=cfg.bias)


@dataclass
class Positions:
    """Where a forward's T new tokens sit, worked out once for every layer: a span from `start`
    for every row, or (`rows`) one position per row. `length` keys are visible after the write;
    `mask` / `causal` are what attention needs to see only a token's own past."""

    start: int
    length: int
    rows: torch.Tensor | None = None  # (B,) each row's position, T = 1
    index: torch.Tensor | None = None  # rows as a KV-cache write index, (B, n_head, 1, head_dim)
    mask: torch.Tensor | None = None
    causal: bool = True


# The modules hold the parameters under GPT-2's names; `GPT._layer` computes with them.
class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in that order
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm and cfg.qk_norm_weight:  # gains of the per-head QK-norm, shared by the heads
            self.ln_q = nn.RMSNorm(cfg.head_dim)
            self.ln_k = nn.RMSNorm(cfg.head_dim)

    def qk_gain(self) -> torch.Tensor | None:
        """The QK-norm's gains as one (2, 1, 1, 1, head_dim) tensor for `qk_norm`, or None."""
        if not hasattr(self, "ln_q"):
            return None
        return torch.stack((self.ln_q.weight, self.ln_k.weight)).view(2, 1, 1, 1, -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # SwiGLU: c_fc's rows are the gate's, then up's (one matrix: one matmul)
        wide = 2 * cfg.mlp_hidden if cfg.activation == "swiglu" else cfg.mlp_hidden
        self.c_fc = nn.Linear(cfg.n_embd, wide, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def tensors(self, cfg: ModelConfig, fold: bool) -> tuple:
        """The block's parameters in the order `GPT._layer` takes them (None: a bias it lacks),
        then each projection's LoRA adapter (None: none, or folded into its weight with `fold`)."""
        a, m = self.attn, self.mlp
        projections = (a.c_attn, a.c_proj, m.c_fc, m.c_proj)
        adapters = [lora.adapter_of(p, cfg) for p in projections]
        weights = [p.weight for p in projections]
        if fold:
            weights, adapters = [lora.fold(w, ad) for w, ad in zip(weights, adapters)], [None] * 4
        return (self.ln_1.weight, getattr(self.ln_1, "bias", None), weights[0], a.c_attn.bias,
                weights[1], a.c_proj.bias, self.ln_2.weight, getattr(self.ln_2, "bias", None),
                weights[2], m.c_fc.bias, weights[3], m.c_proj.bias, a.qk_gain(), *adapters)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attention: list[torch.Tensor], dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim), future masked) @ v, written out so the weights can be kept;
    what scaled_dot_product_attention computes with is_causal=True."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, n_head, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.float().masked_fill(future, float("-inf")).softmax(dim=-1)
    attention.append(weights)
    return _dropout(weights, dropout).to(v.dtype) @ v


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout at p > 0 only: even a no-op dropout costs an operation per call in decoding."""
    return F.dropout(x, p) if p > 0 else x


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
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix embeds and un-embeds
        self.init_weights()
        if cfg.lora_rank:
            lora.attach(self, cfg)  # after init_weights: B starts at zero, not at N(0, 0.02)
        # the layout's switches, read once
        self._rms = cfg.norm == "rmsnorm"
        self._qk_norm = bool(cfg.qk_norm)
        self._qk_norm_first = self._qk_norm and cfg.qk_norm_order == "before_rope"
        self._tensors: list[tuple[torch.Tensor | None, ...]] | None = None

    def _apply(self, fn, recurse=True):
        self._tensors = None  # .to() / .half() may give parameters new tensors: gather them again
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self._tensors = None  # folded LoRA weights are copies: training moves the adapters
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self._tensors = None  # and so does loading other weights
        return super().load_state_dict(*args, **kwargs)

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
        cache: KVCache | None = None,
        pos: int | Sequence[int] | torch.Tensor = 0,
        last_only: bool = False,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """idx (B, T) token ids -> (logits (B, T, vocab), loss); loss is mean cross-entropy vs
        targets (over those that are not -1), None without them.

        cache / pos: the tokens continue a sequence whose keys and values are in `cache` (their own
        are written there): at position `pos` for every row, or, with a list of B positions, one
        token per row (T = 1) each at its own position (rows of a continuous batch); with the B
        positions as a tensor, the same over the whole window with the keys past each row masked:
        shapes that do not change with the positions, for a compiled step (compiled.py). The caller
        keeps the lengths: the cache holds no position. last_only: logits (B, 1, vocab) of the last
        position alone (prefill). With return_attention, -> (logits, loss, attention (n_layer, B,
        n_head, T, T)): row i of a head's map is how token i weighs tokens 0..i. Not with a cache.
        """
        B, T = idx.shape
        if return_attention and cache is not None:
            raise ValueError("return_attention reads a whole sequence; it takes no cache")
        at = self._positions(pos, B, T, idx.device, cache is not None)
        attention: list[torch.Tensor] | None = [] if return_attention else None
        x = F.embedding(idx, self.wte.weight)  # (B, T, C)
        rope = None
        if self.config.pos_emb == "learned":
            # a slice where every row shares the span: no index tensor, cheap backward
            x = x + (self.wpe.weight[at.rows].unsqueeze(1) if at.rows is not None
                     else self.wpe.weight[at.start : at.start + T])
        elif at.rows is not None:  # each row's token rotated by its own position
            rope = (self.rope_cos[at.rows].view(B, 1, 1, -1),  # (B, 1, 1, head_dim)
                    self.rope_sin[at.rows].view(B, 1, 1, -1))
        else:
            rope = (self.rope_cos[at.start : at.start + T],  # (T, head_dim)
                    self.rope_sin[at.start : at.start + T])
        dropout = self.config.dropout if self.training else 0.0
        x = _dropout(x, dropout).view(B * T, -1)  # 2-D through the blocks: the projections' shape
        layers = self._tensors
        if layers is None or self.training:  # training gathers them each step: nothing is kept
            layers = [block.tensors(self.config, fold=not self.training) for block in self.h]
            if not self.training:
                self._tensors = layers
        for i, tensors in enumerate(layers):
            x = self._layer(x, B, T, tensors, rope, at, i, cache, attention, dropout)
        if last_only:
            x, T = x.view(B, T, -1)[:, -1], 1
        x = norm(x, self.ln_f.weight, getattr(self.ln_f, "bias", None), self._rms)
        logits = F.linear(x, self.lm_head.weight).view(B, T, -1)  # (B, T, vocab)
        loss = None
        if targets is not None:
            # -1 marks a target no loss is taken on (a conversation's prompt: data/dataset.py)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
        if attention is not None:
            return logits, loss, torch.stack(attention)
        return logits, loss

    def _layer(self, x: torch.Tensor, B: int, T: int, tensors: tuple[torch.Tensor | None, ...],
               rope: tuple[torch.Tensor, torch.Tensor] | None, at: Positions, i: int,
               cache: KVCache | None, attention: list[torch.Tensor] | None, dropout: float
               ) -> torch.Tensor:
        """Block i: x + attention(ln_1(x)), then + MLP(ln_2(x)); x (B * T, C)."""
        w1, b1, wa, ba, wp, bp, w2, b2, wf, bf, wo, bo, gain, la, lp, lf, lo = tensors  # l*: LoRA
        qkv = lora.project(norm(x, w1, b1, self._rms), wa, ba, la)
        qkv = qkv.view(B, T, 3, self.config.n_head, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        # split, not indexing: its backward is one concatenation instead of zero-filled copies
        qk, v = qkv.split_with_sizes((2, 1))  # queries and keys together: one set of operations
        if self._qk_norm_first:  # qk_norm_order before_rope: a norm does not commute with a rotation
            qk = qk_norm(qk, gain, self._rms)
        if rope is not None:
            qk = apply_rotary(qk, *rope)
        if self._qk_norm and not self._qk_norm_first:
            qk = qk_norm(qk, gain, self._rms)
        q, k = qk.unbind(0)
        v = v.squeeze(0)
        if cache is not None:
            k, v = cache.write(i, k, v, at)  # (B, H, at.length, D)
        if attention is not None:  # same q, k, v (rotary, QK-norm) as below, weights kept
            y = _explicit_attention(q, k, v, attention, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=at.mask, is_causal=at.causal,
                                               dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B * T, -1)  # re-assemble heads
        x = x + _dropout(lora.project(y, wp, bp, lp), dropout)
        h = lora.project(norm(x, w2, b2, self._rms), wf, bf, lf)
        if self.config.activation == "relu2":
            # in place where no graph is recorded: two allocations fewer per decoded token
            h = F.relu(h).square() if torch.is_grad_enabled() else h.relu_().square_()
        elif self.config.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.config.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return x + _dropout(lora.project(h, wo, bo, lo), dropout)

    def _positions(self, pos: int | Sequence[int] | torch.Tensor, B: int, T: int,
                   device: torch.device, cached: bool) -> Positions:
        """The span or the rows a forward writes, its visible keys and its attention mask."""
        if isinstance(pos, int):
            end = pos + T
            mask = None
            if cached and pos > 0 and T > 1:  # query i sees the cached keys and new keys to itself
                mask = torch.ones(T, end, dtype=torch.bool, device=device).tril(pos)
            at = Positions(pos, end, mask=mask, causal=pos == 0)
        else:
            if T != 1 or len(pos) != B or not cached:
                raise ValueError("per-row positions take one token per row and a cache")
            if isinstance(pos, torch.Tensor):  # the whole window, masked (the caller keeps it)
                rows, end, masked = pos, self.config.block_size, True
            else:  # shorter rows must not see the stale keys past their length
                rows, end = torch.tensor(pos, device=device), max(pos) + 1
                masked = min(pos) != end - 1
            mask = None
            if masked:
                mask = (torch.arange(end, device=device) <= rows.view(B, 1)).view(B, 1, 1, end)
            index = rows.view(B, 1, 1, 1).expand(B, self.config.n_head, 1, self.config.head_dim)
            at = Positions(end - 1, end, rows, index, mask, causal=False)
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} exceeds block_size {self.config.block_size}")
        return at

    def num_params(self, non_embedding: bool = False, trainable: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without position embeddings, or
        only those that train (a LoRA model's adapters)."""
        if trainable:
            return sum(p.numel() for p in self.parameters() if p.requires_grad)
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_emb == "learned":
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 6N plus attention), as in the PaLM paper."""
        c = self.config
        n = self.num_params(non_embedding=True)
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size
