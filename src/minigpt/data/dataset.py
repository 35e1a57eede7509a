"""Prepared data as training reads it: the .bin memmaps, their tokenizer and meta, the loss masks of
conversations, and random batches from them (`BatchSampler`). Written by prepare.py; a corpus larger
than RAM trains, since the token ids are memory-mapped.
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
MASK = "{split}.mask"  # conversations: 1 where a token is learnt (prepare.py)
IGNORE = -1  # a target the loss skips (GPT.forward's ignore_index)
REDRAWS = 8  # rounds of drawing again the windows that hold no learnt target, before anchoring them


def is_prepared(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / META).exists()


@dataclass
class PreparedData:
    train: np.memmap
    val: np.memmap
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path
    train_mask: np.memmap | None = None  # conversations only
    val_mask: np.memmap | None = None


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
    masks = _masks(path, meta) if meta.get("loss_mask") else {}
    return PreparedData(splits["train"], splits["val"], load_tokenizer(path / TOKENIZER), meta, path,
                        masks.get("train"), masks.get("val"))


def _masks(path: Path, meta: dict[str, Any]) -> dict[str, np.memmap]:
    masks = {}
    for s in ("train", "val"):
        name = MASK.format(split=s)
        try:
            masks[s] = np.memmap(path / name, dtype=np.uint8, mode="r")
        except FileNotFoundError:
            raise DataError(f"prepared data in {path} is incomplete: {name} missing") from None
        if masks[s].size != meta[f"{s}_tokens"]:
            raise DataError(f"prepared data in {path} is corrupted: {name} size does not match "
                            f"{s}.bin")
    return masks


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

    With a loss `mask` (conversations), a target whose mask is 0 is IGNORE, and a window with no
    learnt target is drawn again: a batch of only ignored targets has no loss to take the mean of.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, mask: np.ndarray | None = None):
        check_split_length("a", len(tokens), block_size)
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.rank, self.world_size, self.mask = rank, world_size, mask
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(block_size + 1)
        self._learnt: np.ndarray | None = None  # positions of learnt targets, found when needed

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, len(self.tokens) - self.block_size,
                                   size=self.batch_size * self.world_size)
        if self.mask is not None:  # over the global batch: every rank draws the same numbers
            starts = self._with_learnt_targets(starts)
        return self.windows(starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the windows at `starts`: y is x shifted by one, IGNORE where the mask is 0."""
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if self.mask is not None:
            learnt = torch.from_numpy(self.mask[starts[:, None] + self._offsets[1:]].astype(bool))
            y.masked_fill_(~learnt, IGNORE)
        return x, y

    def _with_learnt_targets(self, starts: np.ndarray) -> np.ndarray:
        """`starts` with each window that holds no learnt target drawn again (uniform over the
        windows that do); after REDRAWS rounds, the rest are placed around a random learnt
        position, so a mask with very few learnt tokens still fills a batch."""
        for _ in range(REDRAWS):
            empty = ~self.mask[starts[:, None] + self._offsets[1:]].any(axis=1)
            if not empty.any():
                return starts
            starts[empty] = self.rng.integers(0, len(self.tokens) - self.block_size,
                                              size=int(empty.sum()))
        empty = ~self.mask[starts[:, None] + self._offsets[1:]].any(axis=1)
        if empty.any():
            if self._learnt is None:
                self._learnt = np.flatnonzero(self.mask)
            at = self._learnt[self.rng.integers(0, len(self._learnt), size=int(empty.sum()))]
            back = self.rng.integers(1, self.block_size + 1, size=at.size)  # target at offset back
            starts[empty] = np.clip(at - back, 0, len(self.tokens) - self.block_size - 1)
        return starts

    def state_dict(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
