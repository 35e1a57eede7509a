"""How much accelerator memory training needs, per device, before you rent the GPU.

    minigpt info                                   # every preset at its batch size, float32 and bf16
    minigpt info --preset large --batch-size 64    # the breakdown below for one configuration

With N parameters, B sequences of T tokens per device, width C, L layers, vocabulary V, and `a` bytes
per activation element (4 for float32; 2 under bf16/fp16 autocast):

    weights          4N      float32 master weights (autocast never changes them)
    gradients        4N      float32; under DDP they live in the all-reduce buckets, no second copy
    optimizer        8N      AdamW's exp_avg and exp_avg_sq, float32; with --optimizer muon the M
                             hidden-matrix parameters keep one momentum buffer: 8(N - M) + 4M
                             (a LoRA run: gradients and optimizer state of its adapters alone)
    autocast copies  2N      bf16/fp16 casts of the weights kept for the backward pass (0 in float32)
    activations      B*T*C*L*(8 + 15a [+ 2a rotary] [+ 2a QK-norm unless it precedes rotary]
                     [+ 2 with dropout]) + B*T*C*(4 + a)
    logits           B*T*V*(a + 8)

Activations, per layer and token: the residual stream enters each LayerNorm in float32 (2 x 4 bytes);
15 more elements of width C are kept for the backward pass in the compute dtype: the attention input,
q, k, v, the attention output and its re-assembled copy, the MLP input, and the MLP's 4C hidden layer
before and after GELU (4 + 4; ReLU^2 keeps the same two); rotary embeddings and QK-norm each make a
new copy of queries and keys (2 each), but QK-norm before rotary (--qk-norm-order before_rope)
keeps none: the rotation, a product with fixed tables, keeps nothing of its input for backward, so
the norm's output is not kept. Dropout adds two 1-byte masks. Attention is assumed fused
(flash or memory-efficient, as on CUDA), which keeps no T x T score matrix. Logits: the log-softmax
output (float32) and the gradient of the logits (float32) plus the logits themselves in the compute
dtype.

Not included: the CUDA context and allocator slack (typically 0.3-1 GiB), evaluation batches,
torch.compile's savings (fusion usually shrinks activations), and --norm rmsnorm's extra: torch's CPU
RMSNorm is not one fused kernel and keeps 7-23% more than this estimate. `tests/test_memory.py`
checks the activation formula against the tensors autograd actually saves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    autocast_copies: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def training_memory(mcfg: ModelConfig, n_params: int, batch_size: int,
                    mixed_precision: bool, muon_params: int = 0,
                    trained_params: int | None = None) -> MemoryEstimate:
    """Bytes per device for one training micro-batch of `batch_size` sequences (see module doc);
    `trained_params` of the `n_params` train (default: all), `muon_params` of them take Muon steps
    (one buffer), the rest AdamW steps (two)."""
    trained = n_params if trained_params is None else trained_params
    a = 2 if mixed_precision else 4
    tokens = batch_size * mcfg.block_size
    per_layer = 8 + 15 * a + (2 if mcfg.dropout > 0 else 0)
    # rotary and QK-norm each produce a new 2C-wide copy of queries and keys that backward keeps,
    # except QK-norm before rotary: the rotation (a product with fixed tables) keeps none of its input
    rope, qk_norm = mcfg.pos_emb == "rope", bool(mcfg.qk_norm)
    kept_copies = rope + qk_norm - (rope and qk_norm and mcfg.qk_norm_order == "before_rope")
    per_layer += 2 * a * kept_copies
    return MemoryEstimate(
        weights=4 * n_params,
        gradients=4 * trained,
        optimizer=8 * (trained - muon_params) + 4 * muon_params,
        autocast_copies=2 * n_params if mixed_precision else 0,
        activations=tokens * mcfg.n_embd * (mcfg.n_layer * per_layer + 4 + a),
        logits=tokens * mcfg.vocab_size * (a + 8),
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
