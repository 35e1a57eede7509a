"""Preallocated key/value cache for incremental decoding.

The model stays stateless: the cache is passed into `GPT.forward`, each layer writes its new keys and
values at `pos`, and the model advances `pos` once per forward. Buffers are allocated once, so decoding
a token allocates no cache memory (no `torch.cat` growth).

For continuous batching (`batching.py`) every row keeps its own length: `update_rows` writes each
row's new key at that row's own position, `rows` is a view of some rows that a prompt can be
prefilled into through `GPT.forward`, and `copy_rows` moves a row's cached positions to another row
(one prompt prefilled once, copied into n rows; a row that left refilled by the last one).
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
        self._first_rows: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

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

    def update_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                    length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 0..b-1, one new position each: store k, v (b, n_head, 1, head_dim) at the positions
        in `index` (b, n_head, 1, head_dim, each row's position repeated); return views of the
        first `length` positions of those rows (a row's positions past its own length are stale
        and must be masked by the caller)."""
        b = k.size(0)
        views = self._first_rows.get(b)
        if views is None:  # made once per batch size: narrowing each layer each step costs
            views = self._first_rows[b] = ([t.narrow(0, 0, b) for t in self._k],
                                           [t.narrow(0, 0, b) for t in self._v])
        k_all, v_all = views[0][layer], views[1][layer]
        k_all.scatter_(2, index, k)  # one operation for every row, where indexing takes several
        v_all.scatter_(2, index, v)
        return k_all.narrow(2, 0, length), v_all.narrow(2, 0, length)

    def rows(self, start: int, count: int = 1) -> KVCache:
        """A cache over rows start..start+count-1 sharing this one's memory, at position 0."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k.narrow(1, start, count), self.v.narrow(1, start, count)
        view._k = [view.k[i] for i in range(view.k.size(0))]
        view._v = [view.v[i] for i in range(view.v.size(0))]
        view.max_len, view.pos, view._first_rows = self.max_len, 0, {}
        return view

    def copy_rows(self, source: KVCache, src_row: int, dst_row: int, length: int) -> None:
        """Copy the first `length` positions of `source`'s row `src_row` into row `dst_row`, every
        layer in one operation."""
        self.k[:, dst_row, :, :length].copy_(source.k[:, src_row, :, :length])
        self.v[:, dst_row, :, :length].copy_(source.v[:, src_row, :, :length])

    def advance(self, t: int) -> None:
        self.pos += t

    def reset(self) -> None:
        self.pos = 0
