"""Prepared data as training reads it: the .bin memmaps, their tokenizer and meta, and random
batches from them (`BatchSampler`). Written by prepare.py; a corpus larger than RAM trains, since the
token ids are memory-mapped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..rundir import TOKENIZER, check_format
from ..tokenization import Tokenizer, load_tokenizer

META = "meta.json"


def is_prepared(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / META).exists()


@dataclass
class PreparedData:
    train: np.memmap
    val: np.memmap
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path


def load_prepared(path: str | Path) -> PreparedData:
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        dtype = np.dtype(meta["dtype"])
        splits = {s: np.memmap(path / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}
    except FileNotFoundError as e:
        raise DataError(f"prepared data in {path} is incomplete: {Path(e.filename).name} missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"prepared data in {path} is corrupted: {e}") from None
    check_format(meta, path / META)
    for s in ("train", "val"):
        if splits[s].size != meta.get(f"{s}_tokens"):
            raise DataError(f"prepared data in {path} is corrupted: {s}.bin size does not match meta.json")
    return PreparedData(splits["train"], splits["val"], load_tokenizer(path / TOKENIZER), meta, path)


def check_split_length(split: str, tokens: int, block_size: int) -> None:
    """A training window needs block_size + 1 tokens: refuse a split shorter than that."""
    if tokens <= block_size:
        raise DataError(
            f"the {split} split has {tokens} tokens, fewer than block-size + 1 ({block_size + 1}); "
            "use a smaller --block-size or more text"
        )


class BatchSampler:
    """Random (x, y) windows from a token array, reproducible and resumable.

    All ranks of a data-parallel run draw the same global batch of `batch_size * world_size` windows
    from the same seeded generator and each keeps its own slice, so N ranks x B see exactly the
    windows that 1 process x N*B would.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        check_split_length("a", len(tokens), block_size)
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, len(self.tokens) - self.block_size,
                                   size=self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
