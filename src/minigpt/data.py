"""Data: raw text -> token ids in memory-mapped .bin files, and random batches from them.

`prepare()` writes a data directory:

    train.bin, val.bin   token ids, uint16 (uint32 when the vocabulary needs it), read with np.memmap
    tokenizer.json       the tokenizer built from the corpus
    meta.json            counts, dtype, mode, sources

Two modes: a continuous stream (split by position: the last `val_fraction` is validation, as nanoGPT
does) and documents (`lines`, `blank`, `files`), each wrapped as BOS ... EOS and split by document with a
seeded shuffle. Because training reads the .bin files through np.memmap, a corpus larger than RAM trains.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import TOKENIZER, atomic_write_text
from .errors import DataError
from .tokenizers import Tokenizer, load_tokenizer, save_tokenizer, train_tokenizer

META = "meta.json"
DOC_MODES = ("lines", "blank", "files")


def bundled_corpus() -> Path:
    """Tiny Shakespeare, shipped inside the package: the default when no --data is given."""
    return Path(str(resources.files("minigpt") / "corpus" / "tinyshakespeare.txt"))


def read_text(path: Path) -> str:
    """Read a UTF-8 text file, refusing what cannot be a training corpus with a clear reason."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"expected a file, got a directory: {path}") from None
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied") from None
    if not raw:
        raise DataError(f"{path} is empty")
    if b"\x00" in raw[:1 << 20]:
        raise DataError(f"{path} looks like a binary file (it contains NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (bad byte at offset {e.start})") from None
    if not text.strip():
        raise DataError(f"{path} contains only whitespace")
    return text.removeprefix("\ufeff")  # a BOM is an encoding marker, not text


def gather_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, directories expanded to their .txt files (sorted, recursive)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not found:
                raise DataError(f"directory {p} contains no .txt files")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"input not found: {p}")
    if not files:
        raise DataError("no input files given")
    return files


def split_documents(texts: list[str], mode: str) -> list[str]:
    if mode == "lines":
        docs = [line.strip() for t in texts for line in t.splitlines()]
    elif mode == "blank":
        docs = [d.strip() for t in texts for d in re.split(r"\n[ \t\r\f\v]*\n", t)]
    elif mode == "files":
        docs = [t.strip() for t in texts]
    else:
        raise DataError(f"unknown document mode {mode!r}; choose from {', '.join(DOC_MODES)}")
    return [d for d in docs if d]


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _write_bin(path: Path, ids: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    ids.tofile(tmp)
    tmp.replace(path)


def prepare(
    inputs: list[str | Path],
    out_dir: str | Path,
    docs: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 1337,
    tokenizer: str = "char",
    **tokenizer_options: Any,
) -> dict[str, Any]:
    """Tokenize text files into `out_dir`; return the meta.json contents."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val-fraction must be in (0, 1), got {val_fraction}")
    files = gather_inputs(inputs)
    texts = [read_text(f) for f in files]
    if docs is None:
        text = "".join(texts)
        cut = int(len(text) * (1.0 - val_fraction))
        train_parts, val_parts = [text[:cut]], [text[cut:]]
        if not train_parts[0] or not val_parts[0]:
            raise DataError(f"corpus of {len(text)} characters is too short to split")
    else:
        documents = split_documents(texts, docs)
        if len(documents) < 2:
            raise DataError(f"found {len(documents)} document(s) with --docs {docs}; need at least 2")
        n_val = min(len(documents) - 1, max(1, round(len(documents) * val_fraction)))
        val_idx = set(np.random.default_rng(seed).permutation(len(documents))[:n_val].tolist())
        train_parts = [d for i, d in enumerate(documents) if i not in val_idx]
        val_parts = [d for i, d in enumerate(documents) if i in val_idx]
    tok = train_tokenizer(tokenizer, train_parts + val_parts, **tokenizer_options)
    dtype = _dtype_for(tok.vocab_size)

    def encode(parts: list[str]) -> np.ndarray:
        if docs is None:
            return np.asarray(tok.encode(parts[0]), dtype=dtype)
        ids: list[int] = []
        for d in parts:
            ids.append(tok.bos_id)
            ids.extend(tok.encode(d))
            ids.append(tok.eos_id)
        return np.asarray(ids, dtype=dtype)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = encode(train_parts), encode(val_parts)
    _write_bin(out / "train.bin", train_ids)
    _write_bin(out / "val.bin", val_ids)
    save_tokenizer(tok, out / TOKENIZER)
    meta = {
        "format": 1,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "docs": docs,
        "val_fraction": val_fraction,
        "seed": seed,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        # UTF-8 bytes of the text each split covers: the denominator of bits per byte
        "train_bytes": sum(len(p.encode("utf-8")) for p in train_parts),
        "val_bytes": sum(len(p.encode("utf-8")) for p in val_parts),
        "num_docs": None if docs is None else {"train": len(train_parts), "val": len(val_parts)},
        "sources": [str(f) for f in files],
    }
    atomic_write_text(out / META, json.dumps(meta, indent=2) + "\n")
    return meta


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
    for s in ("train", "val"):
        if splits[s].size != meta.get(f"{s}_tokens"):
            raise DataError(f"prepared data in {path} is corrupted: {s}.bin size does not match meta.json")
    return PreparedData(splits["train"], splits["val"], load_tokenizer(path / TOKENIZER), meta, path)


class BatchSampler:
    """Random (x, y) windows from a token array, reproducible and resumable.

    All ranks of a data-parallel run draw the same global batch of `batch_size * world_size` windows
    from the same seeded generator and each keeps its own slice, so N ranks x B see exactly the
    windows that 1 process x N*B would.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if len(tokens) <= block_size:
            raise DataError(
                f"split has {len(tokens)} tokens, needs more than block-size ({block_size}); "
                "use a smaller --block-size or more text"
            )
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
