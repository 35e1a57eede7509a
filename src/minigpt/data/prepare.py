"""`prepare`: raw text -> token ids in memory-mapped .bin files, plus the data directory's meta.

`prepare()` reads text, JSON lines, Parquet and compressed files (corpus.py, formats.py) and writes
a data directory:

    train.bin, val.bin   token ids, uint16 (uint32 when the vocabulary needs it), read with np.memmap
    train.mask, val.mask conversations only (--chat): one uint8 per token, 1 where the token is
                         learnt (the assistant's replies and the EOS after a final reply), 0 elsewhere
    tokenizer.json       the tokenizer built from the corpus
    meta.json            counts, dtype, mode, sources, format version

Two modes: a continuous stream (split by position: the last `val_fraction` is validation, as nanoGPT
does) and documents (`lines`, `blank`, `files`), each wrapped as BOS ... EOS and split by document with a
seeded shuffle. Conversations (`chat`, conversations.py) are documents too, rendered with a chat
template, with a loss mask beside each split. `prepare` streams its input (bounded memory, progress bar) and appends to the .bin
files as it encodes, so a corpus larger than RAM prepares and trains.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..chat_template import ChatTemplate
from ..errors import DataError, TokenizerError
from ..fsio import atomic_write_text
from ..rundir import FORMAT_VERSION, TOKENIZER
from ..tokenization import Tokenizer, save_tokenizer, train_tokenizer
from .conversations import Segments, iter_conversations
from .corpus import DOC_MODES, Chunk, file_chunks, gather_inputs, iter_documents
from .dataset import MASK, META
from .formats import Records

PIECE_CHARS = 1 << 16  # texts handed to encode_batch: small enough to spread over threads
BATCH_CHARS = 1 << 20  # characters per encode_batch call (Hugging Face keeps ~100 bytes per token)


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class _TokenFile:
    """Token ids appended to a hidden temp file, renamed to `path` only once all are written."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.file = open(self.tmp, "wb")  # closed by commit() or abort()
        self.tokens = 0
        self.bytes = 0  # UTF-8 bytes of the text these tokens cover

    def write(self, ids: np.ndarray) -> None:
        self.file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens += ids.size

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """Cut a chunk into pieces of about `size` characters at newlines, for parallel encoding."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size) + 1 or len(text)
        yield text[start:end]
        start = end


class _Encoder:
    """Batches pieces of text through `encode_batch` and appends the ids to their split's file.

    A document is written as BOS ids EOS; a long one is encoded in pieces, so no single call (and no
    array of ids) grows with the size of a file. A conversation's segments are encoded apart, so a
    token never straddles a learnt and an unlearnt piece and the mask (in `masks`) is exact: BOS 0,
    each segment's tokens its learnt flag, the EOS that of the last segment (a final reply ends
    with a learnt EOS: the model learns to stop).
    """

    def __init__(self, tok: Tokenizer, files: dict[str, _TokenFile],
                 masks: dict[str, _TokenFile] | None = None):
        self.tok, self.files, self.masks = tok, files, masks
        self.learnt = dict.fromkeys(files, 0)  # learnt tokens per split
        self.bos = np.array([tok.bos_id], dtype=np.uint32)
        self.eos = np.array([tok.eos_id], dtype=np.uint32)
        # (split, text, BOS before, EOS after, learnt)
        self.batch: list[tuple[str, str, bool, bool, bool]] = []
        self.size = 0

    def add_text(self, split: str, text: str) -> None:
        for piece in _pieces(text):
            self._add(split, piece, False, False)

    def add_document(self, split: str, doc: str) -> None:
        pieces = list(_pieces(doc))
        for i, piece in enumerate(pieces):
            self._add(split, piece, i == 0, i == len(pieces) - 1)

    def add_conversation(self, split: str, segments: Segments) -> None:
        pieces = [(piece, learnt) for text, learnt in segments for piece in _pieces(text)]
        for i, (piece, learnt) in enumerate(pieces):
            self._add(split, piece, i == 0, i == len(pieces) - 1, learnt)

    def _add(self, split: str, text: str, bos: bool, eos: bool, learnt: bool = False) -> None:
        self.batch.append((split, text, bos, eos, learnt))
        self.size += len(text)
        if self.size >= BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        encoded = self.tok.encode_batch([text for _, text, _, _, _ in self.batch])
        for split, out in self.files.items():
            parts, mask = [], []
            for (s, _, bos, eos, learnt), ids in zip(self.batch, encoded):
                if s == split:
                    parts.extend([self.bos] * bos + [ids] + [self.eos] * eos)
                    mask.extend([np.zeros(int(bos), np.uint8), np.full(ids.size + eos, learnt, np.uint8)])
            if parts:
                out.write(np.concatenate(parts))
                if self.masks is not None:
                    mask_ids = np.concatenate(mask)
                    self.masks[split].write(mask_ids)
                    self.learnt[split] += int(mask_ids.sum(dtype=np.int64))
        self.batch, self.size = [], 0


def prepare(
    inputs: list[str | Path],
    out_dir: str | Path,
    docs: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 1337,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int | None = None,
    progress: bool = True,
    text_field: str = "text",
    skip_bad_records: bool = False,
    chat: ChatTemplate | None = None,
    **tokenizer_options: Any,
) -> dict[str, Any]:
    """Tokenize text, JSON-lines, Parquet and compressed files into `out_dir`; return meta.json.

    Two passes over the input, each holding one chunk (or one document) in memory: the first learns
    the tokenizer and counts characters or documents, the second encodes and appends to the .bin files.
    `vocab_size` is the tokenizer's (bpe only), not the model's. `tokenizer` is a kind to learn, or a
    Tokenizer to use as it is (fine-tuning: the data must speak the source model's vocabulary).
    `text_field` names the JSON field / Parquet column of the text; `skip_bad_records` counts bad
    records (meta's `skipped_records`) instead of stopping at the first. `chat`: the files are
    conversations (JSON lines of `messages`), rendered with this template, with loss masks; meta's
    `chat_template` records it, and its `*_bytes` count the learnt text (what the loss is over).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val-fraction must be in (0, 1), got {val_fraction}")
    if docs is not None and docs not in DOC_MODES:
        raise DataError(f"unknown document mode {docs!r}; choose from {', '.join(DOC_MODES)}")
    if chat is not None and docs is not None:
        raise DataError("--chat makes each conversation a document; drop --docs")
    files = gather_inputs(inputs)
    if vocab_size is not None:
        tokenizer_options["vocab_size"] = vocab_size
    total = sum(f.stat().st_size for f in files)
    if not text_field:
        raise DataError("--text-field must not be empty")
    records = Records(text_field, skip_bad_records)
    kind = tokenizer if isinstance(tokenizer, str) else tokenizer.kind
    with _progress_bar(total, f"{kind} tokenizer: reading", progress) as bar:
        tok, units = _learn_tokenizer(files, docs, tokenizer, tokenizer_options, bar.update, records,
                                      chat)
    plan = _SplitPlan.make(units, docs if chat is None else "chat", val_fraction, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = _dtype_for(tok.vocab_size)
    with _progress_bar(total, f"{kind} tokenizer: encoding", progress) as bar:
        # a fresh count: the second pass meets the same bad records again
        encoder = _write_splits(out, files, docs, tok, dtype, plan, bar.update,
                                Records(text_field, skip_bad_records), chat)
    save_tokenizer(tok, out / TOKENIZER)
    meta = _meta(tok, dtype, docs, val_fraction, seed, encoder.files, plan, files,
                 tokenizer_options)
    meta.update(text_field=text_field, skipped_records=records.skipped,
                first_bad_record=records.first_bad)
    if chat is not None:
        meta.update(chat_template=chat.to_dict(), loss_mask=True,
                    **{f"{s}_learnt_tokens": n for s, n in encoder.learnt.items()})
    atomic_write_text(out / META, json.dumps(meta, indent=2) + "\n")
    return meta


def _write_splits(out: Path, files: list[Path], docs: str | None, tok: Tokenizer, dtype: np.dtype,
                  plan: _SplitPlan, on_read: Callable[[int], None], records: Records,
                  chat: ChatTemplate | None) -> _Encoder:
    """Pass 2 into train.bin / val.bin (and, for conversations, their masks), each file in place
    only once all of them are written; -> the encoder, with its counts."""
    bins = {s: _TokenFile(out / f"{s}.bin", dtype) for s in ("train", "val")}
    masks = ({s: _TokenFile(out / MASK.format(split=s), np.dtype(np.uint8)) for s in bins}
             if chat is not None else None)
    written = [*bins.values(), *(masks or {}).values()]
    encoder = _Encoder(tok, bins, masks)
    try:
        _encode_splits(files, docs, encoder, plan, on_read, records, chat)
        for f in written:
            f.commit()
    except BaseException:
        for f in written:
            f.abort()
        raise
    return encoder


def _meta(tok: Tokenizer, dtype: np.dtype, docs: str | None, val_fraction: float, seed: int,
          bins: dict[str, _TokenFile], plan: _SplitPlan, files: list[Path],
          tokenizer_options: dict[str, Any]) -> dict[str, Any]:
    """The data directory's meta.json."""
    return {
        "format": FORMAT_VERSION,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "tokenizer_vocab_size": tokenizer_options.get("vocab_size"),  # asked for; None = default
        "dtype": dtype.name,
        "docs": docs,
        "val_fraction": val_fraction,
        "seed": seed,
        "train_tokens": bins["train"].tokens,
        "val_tokens": bins["val"].tokens,
        # UTF-8 bytes of the text each split covers: the denominator of bits per byte
        "train_bytes": bins["train"].bytes,
        "val_bytes": bins["val"].bytes,
        "num_docs": plan.num_docs(),
        "sources": [str(f) for f in files],
    }


def _learn_tokenizer(files: list[Path], docs: str | None, kind: str | Tokenizer,
                     options: dict[str, Any], on_read: Callable[[int], None],
                     records: Records, chat: ChatTemplate | None) -> tuple[Tokenizer, int]:
    """Pass 1: the tokenizer learnt from the corpus (or the one given, which then checks that it
    can encode every text), and how many characters (stream) or documents the corpus holds: what
    the split needs."""
    units = 0

    def texts() -> Iterator[str]:
        # In pieces: the BPE trainer reads a few hundred texts ahead, and pieces keep that small.
        nonlocal units
        if chat is not None:
            source: Iterator[str] = ("".join(text for text, _ in c)
                                     for c in iter_conversations(files, chat, records, on_read))
        elif docs is None:
            source = (c.text for c in _chunks(files, on_read, records))
        else:
            source = iter_documents(files, docs, on_read, records)
        for text in source:
            units += len(text) if docs is None and chat is None else 1
            yield from _pieces(text)

    if isinstance(kind, str):
        return train_tokenizer(kind, texts(), **options), units
    if options:
        raise DataError(f"a given {kind.kind} tokenizer takes no options ({', '.join(options)})")
    _check_encodable(kind, texts())
    return kind, units


def _check_encodable(tok: Tokenizer, texts: Iterator[str]) -> None:
    """A given tokenizer must encode the whole corpus: name every character it cannot, up front,
    rather than failing at the first one halfway through writing the .bin files."""
    stoi = getattr(tok, "stoi", None)
    if stoi is None:  # bytes and bpe encode any valid Unicode; pass 2 reports a lone surrogate
        for _ in texts:
            pass
        return
    unknown: set[str] = set()
    for text in texts:
        unknown.update(set(text) - stoi.keys())
    if unknown:
        shown = ", ".join(repr(c) for c in sorted(unknown)[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise TokenizerError(f"the text contains {len(unknown)} character(s) the source model's "
                             f"{tok.kind} tokenizer cannot encode: {shown}{more}")


@dataclass
class _SplitPlan:
    """Where validation is: the characters from `cut` on (stream), or the documents `is_val` marks."""

    units: int
    cut: int | None = None
    is_val: np.ndarray | None = None

    @classmethod
    def make(cls, units: int, docs: str | None, val_fraction: float, seed: int) -> _SplitPlan:
        if docs is None:
            cut = int(units * (1.0 - val_fraction))  # the last val_fraction of the text, by position
            if cut == 0 or cut == units:
                raise DataError(f"corpus of {units} characters is too short to split")
            return cls(units, cut=cut)
        if units < 2:
            raise DataError(f"found {units} conversation(s); need at least 2" if docs == "chat" else
                            f"found {units} document(s) with --docs {docs}; need at least 2")
        n_val = min(units - 1, max(1, round(units * val_fraction)))
        is_val = np.zeros(units, dtype=bool)
        is_val[np.random.default_rng(seed).permutation(units)[:n_val]] = True
        return cls(units, is_val=is_val)

    def num_docs(self) -> dict[str, int] | None:
        if self.is_val is None:
            return None
        val = int(self.is_val.sum())
        return {"train": self.units - val, "val": val}


def _encode_splits(files: list[Path], docs: str | None, encoder: _Encoder, plan: _SplitPlan,
                   on_read: Callable[[int], None], records: Records,
                   chat: ChatTemplate | None) -> None:
    """Pass 2: encode in batches and append to train.bin / val.bin (and the masks)."""
    bins = encoder.files
    seen = 0
    if chat is not None:
        for segments in iter_conversations(files, chat, records, on_read):
            split = "val" if seen < plan.units and plan.is_val[seen] else "train"
            bins[split].bytes += sum(len(t.encode("utf-8")) for t, learnt in segments if learnt)
            encoder.add_conversation(split, segments)
            seen += 1
    elif docs is None:
        for chunk in _chunks(files, on_read, records):
            head = chunk.text[: max(0, plan.cut - seen)]
            head_bytes = chunk.nbytes if len(head) == len(chunk.text) else len(head.encode())
            for split, text, nbytes in (("train", head, head_bytes),
                                        ("val", chunk.text[len(head):], chunk.nbytes - head_bytes)):
                bins[split].bytes += nbytes
                encoder.add_text(split, text)
            seen += len(chunk.text)
    else:
        for doc in iter_documents(files, docs, on_read, records):
            split = "val" if seen < plan.units and plan.is_val[seen] else "train"
            bins[split].bytes += len(doc.encode("utf-8"))
            encoder.add_document(split, doc)
            seen += 1
    encoder.flush()
    if seen != plan.units:
        raise DataError("the input files changed while they were being prepared; run prepare again")
    for split, n in encoder.learnt.items():
        if chat is not None and n == 0:
            raise DataError(f"the {split} split has no assistant tokens to learn")


def _chunks(files: list[Path], on_read: Callable[[int], None], records: Records) -> Iterator[Chunk]:
    for f in files:
        yield from file_chunks(f, on_read, records)


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    # disable=None: shown only when stderr is a terminal, so logs and tests stay clean
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True, leave=False)
