"""Preallocated key/value cache for incremental decoding.

The model stays stateless: the cache is passed into `GPT.forward`, each layer writes its new keys and
values at `pos`, and the model advances `pos` once per forward. Buffers are allocated once, so decoding
a token allocates no cache memory (no `torch.cat` growth).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # per-layer views made once: indexing the 5-D buffers each step costs several operations
        self._k, self._v = [self.k[i] for i in range(n_layer)], [self.v[i] for i in range(n_layer)]
        self.max_len = max_len
        self.pos = 0  # number of positions already filled

    @classmethod
    def for_model(cls, model, batch_size: int, device=None, dtype=None) -> KVCache:
        p = next(model.parameters())
        c = model.config
        return cls(
            c.n_layer, batch_size, c.n_head, c.block_size, c.n_embd // c.n_head,
            device=device or p.device, dtype=dtype or p.dtype,
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_head, T, head_dim) at pos..pos+T; return views of everything cached so far."""
        t = k.size(2)
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len} positions")
        k_all, v_all = self._k[layer], self._v[layer]
        # narrow: one operation per view, where k_all[:, :, a:b] dispatches a slice per dimension
        k_all.narrow(2, self.pos, t).copy_(k)
        v_all.narrow(2, self.pos, t).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)

    def advance(self, t: int) -> None:
        self.pos += t

    def reset(self) -> None:
        self.pos = 0
