"""Reading UTF-8 corpora in bounded memory: which files, validated chunks of a file, and the
documents in them, whatever the file's format (formats.py reads JSON lines, Parquet and compressed
files). The bundled Tiny Shakespeare is found here too.

`prepare()` reads its input twice (once to learn the vocabulary and count, once to encode), and a corpus
may be larger than RAM, so everything here is a generator that holds one chunk at a time (and, in
document mode, one document). Chunks end just after a newline, so a line is never cut in two unless it
is longer than a whole chunk; then the cut falls between two characters, never inside one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from ..config import DOC_MODES
from ..errors import DataError
from .formats import Records, is_known_input, iter_records, kind_of, open_binary, read_or_fail

CHUNK_BYTES = 1 << 22  # 4 MiB read at a time
_NUL_CHECK_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_LINE_ENDS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on
_BLANK_LINE = re.compile(r"[ \t\r\f\v]*")  # a line made only of these separates documents in `blank`


def bundled_corpus() -> Path:
    """Tiny Shakespeare, shipped inside the package: the default when no --data is given."""
    return Path(str(resources.files("minigpt.data") / "tinyshakespeare.txt"))


def gather_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, directories expanded to the files of known formats in them (sorted,
    recursive): .txt, .jsonl, .ndjson, each plain or .gz/.bz2/.xz/.zst, and .parquet."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_known_input(q))
            if not found:
                raise DataError(f"directory {p} contains no .txt, .jsonl or .parquet files "
                                "(plain or .gz/.bz2/.xz/.zst)")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"input not found: {p}")
    if not files:
        raise DataError("no input files given")
    return files


class Chunk(NamedTuple):
    text: str
    nbytes: int  # UTF-8 bytes of `text` (a leading BOM is not text and not counted)


def _utf8_boundary(data: bytes) -> int:
    """The largest cut <= len(data) that does not fall inside a multi-byte UTF-8 character."""
    end = len(data)
    k = 0  # continuation bytes at the end
    while k < 3 and end - k > 0 and data[end - k - 1] & 0xC0 == 0x80:
        k += 1
    if end - k == 0:
        return end
    lead = data[end - k - 1]
    need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return end - k - 1 if k + 1 < need else end


def read_chunks(path: Path, on_read: Callable[[int], None] | None = None,
                chunk_bytes: int | None = None) -> Iterator[Chunk]:
    """Yield a text file's contents (decompressed, for .gz/.bz2/.xz/.zst) in chunks, refusing what
    cannot be a training corpus.

    Errors (one line each): missing, a directory, unreadable, empty, binary (NUL bytes in the first
    MiB), not UTF-8 (with the offset of the bad byte), only whitespace, a damaged compressed file.
    `on_read(n)` is told how many bytes were read from disk, for a progress bar.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    with open_binary(path, on_read) as f:
        offset = 0  # offset of pending[0] in the (decompressed) text
        pending = b""
        has_text = False
        first = True
        while True:
            raw = read_or_fail(f, path, max(chunk_bytes, len(_BOM)) if first else chunk_bytes)
            data = pending + raw if pending else raw
            if first:
                if not data:
                    raise DataError(f"{path} is empty")
                if b"\x00" in data[:_NUL_CHECK_BYTES]:
                    raise DataError(f"{path} looks like a binary file (it contains NUL bytes), not text")
                if data.startswith(_BOM):  # an encoding marker, not text
                    data, offset = data[len(_BOM):], len(_BOM)
                first = False
            if not raw:
                cut = len(data)
            else:
                cut = data.rfind(b"\n") + 1 or _utf8_boundary(data)
            piece, pending = data[:cut], data[cut:]
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not valid UTF-8 (bad byte at offset {offset + e.start})") from None
            offset += cut
            if not has_text and text.strip():
                has_text = True
            if text:
                yield Chunk(text, cut)
            if not raw:
                break
        if not has_text:
            raise DataError(f"{path} contains only whitespace")


def file_chunks(path: Path, on_read: Callable[[int], None] | None = None,
                records: Records | None = None) -> Iterator[Chunk]:
    """A file as one stream of text, whatever its format. JSON lines and Parquet: each record's
    text followed by a newline (so a file of one-line records reads exactly like the .txt of those
    lines), gathered into chunks of about CHUNK_BYTES."""
    if kind_of(path) == "text":
        yield from read_chunks(path, on_read=on_read)
        return
    texts: list[str] = []
    size = 0
    for text, nbytes in iter_records(path, records or Records(), on_read):
        texts.append(text + "\n")
        size += nbytes + 1
        if size >= CHUNK_BYTES:
            yield Chunk("".join(texts), size)
            texts, size = [], 0
    if texts:
        yield Chunk("".join(texts), size)


def iter_documents(files: Iterable[Path], mode: str,
                   on_read: Callable[[int], None] | None = None,
                   records: Records | None = None) -> Iterator[str]:
    """The documents of the files, stripped, empty ones dropped; never spanning two files.

    lines: one per line (str.splitlines). blank: separated by lines holding only spaces/tabs.
    files: one per file. JSON lines and Parquet: one per record, whatever the mode (a record is
    already a document). One document is held in memory at a time.
    """
    if mode not in DOC_MODES:
        raise DataError(f"unknown document mode {mode!r}; choose from {', '.join(DOC_MODES)}")
    for path in files:
        if kind_of(path) != "text":
            for text, _ in iter_records(path, records or Records(), on_read):
                if doc := text.strip():
                    yield doc
            continue
        texts = (c.text for c in read_chunks(path, on_read=on_read))
        if mode == "lines":
            yield from _line_documents(texts)
        elif mode == "blank":
            yield from _blank_separated_documents(texts)
        else:
            doc = "".join(texts).strip()
            if doc:
                yield doc


def _line_documents(texts: Iterable[str]) -> Iterator[str]:
    partial: list[str] = []  # pieces of a line longer than a chunk
    for text in texts:
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if i == len(lines) - 1 and line[-1] not in _LINE_ENDS:
                partial.append(line)
                break
            if partial:
                line = "".join(partial) + line
                partial = []
            if doc := line.strip():
                yield doc
    if partial and (doc := "".join(partial).strip()):
        yield doc


def _blank_separated_documents(texts: Iterable[str]) -> Iterator[str]:
    # Same documents as re.split(r"\n[ \t\r\f\v]*\n", text): a run of blank lines separates two
    # documents, and whatever whitespace is left at a document's edges is stripped.
    group: list[str] = []  # the lines of the current document
    partial: list[str] = []  # the current line, while it is not finished
    for text in texts:
        parts = text.split("\n")
        if len(parts) == 1:
            partial.append(text)
            continue
        partial.append(parts[0])
        parts[0] = "".join(partial)
        partial = [parts[-1]]
        for line in parts[:-1]:
            if _BLANK_LINE.fullmatch(line):
                if doc := "\n".join(group).strip():
                    yield doc
                group = []
            else:
                group.append(line)
    group.append("".join(partial))  # the file's last line: no newline after it, so never a separator
    if doc := "\n".join(group).strip():
        yield doc
