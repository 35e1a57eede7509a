"""`minigpt eval`: loss, perplexity and bits per byte of a trained run on a text, every token once.

The text is a file (`--data`, tokenized with the run's tokenizer as `prepare` would) or a split of
the run's own prepared data (`--split`). It is scored with a sliding window of the model's context T
moved by a stride S (default T/2): the first window scores each of its T targets, every later one
only the S targets the windows before it had not reached, so each token after the first is scored
exactly once, with at least T - S + 1 and at most T tokens of context. S = T is non-overlapping
windows (the whole-split figure the benchmarks quote: `split_loss`); S = 1 scores every token with
the longest context the model allows (slowest: T times the work of S = T).

Bits per byte spreads the mean loss over all the text's tokens and divides by its UTF-8 bytes, as
training's val_bpb does (data/bpb.py), so runs with different tokenizers compare on the same text.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import rundir
from ..data.bpb import bits_per_byte
from ..data.corpus import iter_documents, read_chunks
from ..data.dataset import is_prepared, load_prepared
from ..engine import load
from ..errors import ConfigError, DataError, TokenizerError
from ..model import GPT
from ..scoring import windows
from ..tokenization import Tokenizer

SPLITS = ("val", "train")
PIECE_CHARS = 1 << 16  # characters per text given to encode_batch: bounded memory on large files
BATCH_PIECES = 16  # texts per encode_batch call, which BPE spreads over threads


# --- scoring ---------------------------------------------------------------------------------------


@torch.inference_mode()
def score_tokens(model: GPT, tokens: np.ndarray, stride: int | None = None, batch_size: int = 64,
                 progress: bool = False, desc: str = "") -> tuple[float, int]:
    """(mean loss in nats, predictions scored) of `tokens` under `model`, each token once.

    `tokens` may be a memmap: windows are gathered batch by batch, never the whole array at once.
    """
    if len(tokens) < 2:
        raise DataError(f"need at least 2 tokens to score, got {len(tokens)}")
    model.eval()
    context = model.config.block_size
    plan = windows(len(tokens), context, stride or max(1, context // 2))
    length = min(context, len(tokens) - 1)
    device = next(model.parameters()).device
    offsets = np.arange(length + 1)
    positions = torch.arange(length, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    bar = tqdm(total=len(plan), desc=desc, unit="window", disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True, leave=False)
    with bar:
        for i in range(0, len(plan), batch_size):
            batch = np.array(plan[i : i + batch_size])
            ids = torch.from_numpy(np.asarray(tokens[batch[:, :1] + offsets], dtype=np.int64))
            ids = ids.to(device)
            logits, _ = model(ids[:, :-1])
            nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
            first = torch.from_numpy(batch[:, 1]).to(device)
            total += nll.masked_fill(positions[None, :] < first[:, None], 0.0).sum(dtype=torch.float64)
            bar.update(len(batch))
    return total.item() / (len(tokens) - 1), len(tokens) - 1


def split_loss(model: GPT, tokens: np.ndarray, batch_size: int = 64) -> float:
    """Mean next-token loss over a whole split in non-overlapping context windows (stride = context):
    the benchmarks' whole-split figure, the last partial window included."""
    return score_tokens(model, tokens, stride=model.config.block_size, batch_size=batch_size)[0]


# --- the text to score -----------------------------------------------------------------------------


@dataclass
class Text:
    """Token ids of the text one run scores, the UTF-8 bytes they cover, and what it is."""

    tokens: np.ndarray
    nbytes: int
    label: str


def _pieces(text: str) -> Iterator[str]:
    """Pieces of about PIECE_CHARS, cut after a newline where `prepare` cuts: the same ids."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + PIECE_CHARS) + 1 or len(text)
        yield text[start:end]
        start = end


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    """The texts' pieces, BATCH_PIECES to a list: one encode_batch call each."""
    batch: list[str] = []
    for text in texts:
        for piece in _pieces(text):
            batch.append(piece)
            if len(batch) == BATCH_PIECES:
                yield batch
                batch = []
    if batch:
        yield batch


def _encode(batches: Iterable[list[str]], tokenizer: Tokenizer, where: str, run: str,
            every_char: Iterable[str]) -> list[np.ndarray]:
    """encode_batch over the pieces; an unencodable character: one line naming all of them."""
    try:
        return [ids for batch in batches for ids in tokenizer.encode_batch(batch)]
    except TokenizerError:
        pass
    unknown: set[str] = set()
    for chars in every_char:  # the error path only: find every character, not the first piece's
        for c in set(chars) - unknown:
            try:
                tokenizer.encode(c)
            except TokenizerError:
                unknown.add(c)
    shown = ", ".join(repr(c) for c in sorted(unknown)[:10])
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    raise TokenizerError(f"{where} contains {len(unknown)} character(s) the tokenizer of {run} "
                         f"has never seen: {shown}{more}")


def file_text(path: str | Path, tokenizer: Tokenizer, docs: str | None, run: str) -> Text:
    """A text file tokenized as `prepare` would for this run: the whole stream, or (document runs)
    each document of the run's mode wrapped in BOS ... EOS. Bytes exclude a BOM, as prepare's do."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"--data must be a text file, got a directory: {path}")
    if not path.exists():
        raise DataError(f"input not found: {path}")
    chunks = lambda: (c.text for c in read_chunks(path))  # noqa: E731  (re-read on the error path)
    if docs is None:
        nbytes = sum(c.nbytes for c in read_chunks(path))
        parts = _encode(_batches(chunks()), tokenizer, str(path), run, chunks())
    else:
        documents = list(iter_documents([path], docs))
        nbytes = sum(len(doc.encode("utf-8")) for doc in documents)
        parts = _document_parts(documents, tokenizer, str(path), run, chunks())
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
    return Text(tokens, nbytes, str(path))


def _document_parts(documents: list[str], tokenizer: Tokenizer, where: str, run: str,
                    every_char: Iterable[str]) -> list[np.ndarray]:
    """BOS ids EOS for each document, as prepare writes them; all pieces in few encode_batch calls."""
    bos = np.array([tokenizer.bos_id], dtype=np.uint32)
    eos = np.array([tokenizer.eos_id], dtype=np.uint32)
    pieces = [list(_pieces(doc)) for doc in documents]
    ids = iter(_encode(_batches(p for doc in pieces for p in doc), tokenizer, where, run,
                       every_char))
    return [part for doc in pieces for part in (bos, *(next(ids) for _ in doc), eos)]


def run_data_dir(run_dir: Path) -> Path:
    """The run's prepared data: the prepared directory it was trained on, or RUN/data."""
    _, tcfg = rundir.read_config(run_dir)
    for candidate in (tcfg.data, run_dir / "data"):
        if candidate and is_prepared(candidate):
            return Path(candidate)
    raise DataError(f"{run_dir} has no prepared data ({run_dir / 'data'}); "
                    "score a text file with --data FILE")


def split_text(run_dir: Path, split: str) -> Text:
    if split not in SPLITS:
        raise ConfigError(f"--split must be val or train, got {split!r}")
    data = load_prepared(run_data_dir(run_dir))
    return Text(getattr(data, split), int(data.meta.get(f"{split}_bytes") or 0),
                f"{split} split of {data.path}")


def _same_text_for(run: str, tokenizer: Tokenizer, docs: str | None, base: Text,
                   base_tokenizer: Tokenizer, base_docs: str | None) -> Text:
    """The first run's split, for another run of --compare: the same ids when the tokenizers are
    the same, else its text decoded and encoded again (a stream; documents need --data)."""
    if tokenizer.to_dict() == base_tokenizer.to_dict() and docs == base_docs:
        return base
    if docs is not None or base_docs is not None:
        raise ConfigError(f"cannot compare {run} on {base.label}: it is a different tokenizer or "
                          "document mode; compare document-mode runs on a text file (--data FILE)")
    text = base_tokenizer.decode(np.asarray(base.tokens).tolist())
    parts = _encode(_batches([text]), tokenizer, base.label, run, [text])
    return Text(np.concatenate(parts), base.nbytes, base.label)


# --- evaluating runs -------------------------------------------------------------------------------


@dataclass
class EvalResult:
    run: str
    step: int | None
    checkpoint: str
    text: str
    tokenizer: str
    tokens: int  # of the text; tokens - 1 are scored (the first has nothing to be predicted from)
    bytes: int
    context: int
    stride: int
    loss: float
    perplexity: float
    bits_per_byte: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(run_dirs: Sequence[str | Path], data: str | Path | None = None, split: str = "val",
             checkpoint: str = "best", stride: int | None = None, batch_size: int = 64,
             device: str = "auto", dtype: str = "float32",
             progress: bool = True) -> list[EvalResult]:
    """Score every run on the same text: the file `data`, or the first run's `split`.

    Each run keeps its own context; `stride` (default: half of each run's context) must fit each.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    runs = [Path(r) for r in run_dirs]
    engines = []
    for run in runs:  # every run loads, and every stride fits, before any scoring starts
        engine = load(run, checkpoint=checkpoint, device=device, dtype=dtype)
        context = engine.block_size
        if stride is not None and not 1 <= stride <= context:
            raise ConfigError(f"--stride must be between 1 and the context of {run} ({context}), "
                              f"got {stride}")
        engines.append(engine)
    docs = [rundir.read_config(run)[1].docs for run in runs]
    base = split_text(runs[0], split) if data is None else None
    texts = [file_text(data, e.tokenizer, d, str(r)) if base is None else
             _same_text_for(str(r), e.tokenizer, d, base, engines[0].tokenizer, docs[0])
             for r, e, d in zip(runs, engines, docs)]
    return [_score(run, engine, text, checkpoint, stride, batch_size, progress)
            for run, engine, text in zip(runs, engines, texts)]


def _score(run: Path, engine: Any, text: Text, checkpoint: str, stride: int | None,
           batch_size: int, progress: bool) -> EvalResult:
    context = engine.block_size
    stride = stride or max(1, context // 2)
    t0 = time.perf_counter()
    loss, _ = score_tokens(engine.model, text.tokens, stride, batch_size, progress, desc=run.name)
    seconds = time.perf_counter() - t0
    tok = engine.tokenizer
    return EvalResult(
        run=str(run), step=engine.step, checkpoint=checkpoint, text=text.label,
        tokenizer=f"{tok.kind} {tok.vocab_size}", tokens=len(text.tokens), bytes=text.nbytes,
        context=context, stride=stride, loss=round(loss, 6),
        perplexity=round(math.exp(loss), 4) if loss < 700 else math.inf,  # a diverged model
        bits_per_byte=(round(bits_per_byte(loss, len(text.tokens), text.nbytes), 6)
                       if text.nbytes else None),
        seconds=round(seconds, 3))


# --- output ----------------------------------------------------------------------------------------


def format_result(r: EvalResult) -> str:
    bpb = f", {r.bits_per_byte:.4f} bits per byte" if r.bits_per_byte is not None else ""
    return (f"{r.run} (step {r.step}, checkpoint {r.checkpoint}) on {r.text}: {r.tokens:,} tokens, "
            f"{r.bytes:,} bytes, context {r.context}, stride {r.stride}\n"
            f"loss {r.loss:.4f}, perplexity {r.perplexity:.3f}{bpb} ({r.seconds:.1f} s)")


def format_table(rows: list[EvalResult]) -> str:
    """One line per run; bits per byte is the column that compares runs with different tokenizers."""
    width = max(len("run"), *(len(r.run) for r in rows))
    lines = [f"{'run':<{width}}  {'step':>6}  {'tokenizer':<10}  {'tokens':>10}  {'stride':>6}  "
             f"{'loss':>7}  {'ppl':>8}  {'bpb':>7}  {'s':>6}"]
    for r in rows:
        bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "-"
        lines.append(f"{r.run:<{width}}  {r.step if r.step is not None else '-':>6}  "
                     f"{r.tokenizer:<10}  {r.tokens:>10,}  {r.stride:>6}  {r.loss:>7.4f}  "
                     f"{r.perplexity:>8.3f}  {bpb:>7}  {r.seconds:>6.1f}")
    lines.append(f"text: {rows[0].text}, {rows[0].bytes:,} bytes")
    return "\n".join(lines)
