"""Preallocated key/value cache for incremental decoding.

The model stays stateless and so does the cache: it is memory, passed into `GPT.forward` with the
position the new tokens start at, and each layer writes its new keys and values there. The caller
(`batching.Batcher`) keeps every row's length. Buffers are allocated once, so decoding a token
allocates no cache memory (no `torch.cat` growth).

`write` takes the forward's `Positions`: one span for every row (a prompt, or a chunk of one), or
one position per row (a continuous batch, each row at its own length). `rows` is a view of some
rows that a prompt can be prefilled into, and `copy_rows` moves a row's cached positions to another
row (one prompt prefilled once, copied into n rows; a row that left refilled by the last one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import Positions


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
        self.max_len = max_len
        self._views()

    def _views(self) -> None:
        # per-layer views made once: indexing the 5-D buffers each step costs several operations
        self._k = [self.k[i] for i in range(self.k.size(0))]
        self._v = [self.v[i] for i in range(self.v.size(0))]
        self._first_rows: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @classmethod
    def for_model(cls, model, batch_size: int, device=None, dtype=None) -> KVCache:
        p = next(model.parameters())
        c = model.config
        return cls(
            c.n_layer, batch_size, c.n_head, c.block_size, c.n_embd // c.n_head,
            device=device or p.device, dtype=dtype or p.dtype,
        )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: Positions
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_head, T, head_dim) of rows 0..B-1 where `at` says; return views of the
        first `at.length` positions of those rows (with per-row positions, a row's positions past
        its own length are stale: `at.mask` hides them)."""
        if at.length > self.max_len:
            raise ValueError(f"KV cache overflow: {at.length} > {self.max_len} positions")
        b = k.size(0)
        views = self._first_rows.get(b)
        if views is None:  # made once per batch size: narrowing each layer each step costs
            views = self._first_rows[b] = ([t.narrow(0, 0, b) for t in self._k],
                                           [t.narrow(0, 0, b) for t in self._v])
        k_all, v_all = views[0][layer], views[1][layer]
        if at.index is None:
            # narrow: one operation per view, where k_all[:, :, a:b] dispatches a slice per dimension
            k_all.narrow(2, at.start, k.size(2)).copy_(k)
            v_all.narrow(2, at.start, v.size(2)).copy_(v)
        else:  # one operation for every row, where indexing takes several
            k_all.scatter_(2, at.index, k)
            v_all.scatter_(2, at.index, v)
        return k_all.narrow(2, 0, at.length), v_all.narrow(2, 0, at.length)

    def rows(self, start: int, count: int = 1) -> KVCache:
        """A cache over rows start..start+count-1 sharing this one's memory."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k.narrow(1, start, count), self.v.narrow(1, start, count)
        view.max_len = self.max_len
        view._views()
        return view

    def copy_rows(self, source: KVCache, src_row: int, dst_row: int, length: int) -> None:
        """Copy the first `length` positions of `source`'s row `src_row` into row `dst_row`, every
        layer in one operation."""
        self.k[:, dst_row, :, :length].copy_(source.k[:, src_row, :, :length])
        self.v[:, dst_row, :, :length].copy_(source.v[:, src_row, :, :length])
