"""Input formats other than plain text: which format a file is, decompressing .gz/.bz2/.xz/.zst as a
stream, and the records of JSON-lines and Parquet files, one record at a time.

A record is one text taken from a JSON object's field (`--text-field`, default `text`) or a Parquet
column of that name. Nothing here reads a whole file: JSON lines are read line by line through the
decompressor, Parquet in batches of rows, so memory is bounded by the longest record (and one
Parquet row group's column chunk, which pyarrow decompresses as a unit).

A bad record (a malformed line, a missing field, a null or non-string value) raises a one-line
DataError naming the file and the line (or row), unless skipping is asked for; then `Records` counts
them, and prepare reports the count.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import DataError

COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
JSON_LINES = (".jsonl", ".json", ".ndjson")
TEXT = (".txt",)
PARQUET = ".parquet"
# What a directory is expanded to: text and JSON lines, plain or compressed, and Parquet. Not .json:
# a directory may hold minigpt's own meta.json/tokenizer.json or other programs' settings, so a
# .json file of JSON lines is read only when named.
DIRECTORY_SUFFIXES = tuple(b + c for b in (*TEXT, ".jsonl", ".ndjson")
                           for c in ("", *COMPRESSIONS)) + (PARQUET,)
PARQUET_BATCH_ROWS = 1024  # rows converted to Python strings at a time
DATA_EXTRA = "pip install 'minigpt[data]'"
_DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)


def split_suffix(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression) of a file name: `a.jsonl.gz` -> (".jsonl", "gzip")."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), compression


def kind_of(path: Path) -> str:
    """"text", "jsonl" or "parquet": how a file's contents become text. Any other name is text,
    as it always was for a file named explicitly."""
    base, compression = split_suffix(path)
    if base == PARQUET:
        if compression:
            raise DataError(f"{path}: a compressed .parquet file is not supported (Parquet compresses "
                            "its own columns); decompress it first")
        return "parquet"
    return "jsonl" if base in JSON_LINES else "text"


def is_known_input(path: Path) -> bool:
    return path.name.lower().endswith(DIRECTORY_SUFFIXES)


class _Counting(io.RawIOBase):
    """A file whose reads are reported to `on_read`: progress counts compressed bytes on disk."""

    def __init__(self, f: BinaryIO, on_read: Callable[[int], None] | None):
        self.f, self.on_read = f, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer of any kind
        n = self.f.readinto(buffer)
        if n and self.on_read is not None:
            self.on_read(n)
        return n


class _Zstd(io.RawIOBase):
    """Zstandard frames decompressed as a stream. Not zstandard's stream_reader: that one ends
    quietly at a truncated frame, and a cut-off corpus must be an error, not silently shorter."""

    IN_BYTES = 1 << 16  # compressed bytes per step: bounds what one step can expand to

    def __init__(self, raw: BinaryIO):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"reading .zst files needs zstandard: {DATA_EXTRA}") from None
        self.raw, self.error = raw, zstandard.ZstdError
        self.dctx = zstandard.ZstdDecompressor()
        self.obj = self.dctx.decompressobj()
        self.started = False  # a frame has begun and not ended
        self.out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer of any kind
        while not self.out:
            data = self.raw.read(self.IN_BYTES)
            if not data:
                if self.started:
                    raise self.error("the file ends inside a zstd frame")
                return 0
            self.out = self._decompress(data)
        n = min(len(buffer), len(self.out))
        buffer[:n] = self.out[:n]
        self.out = self.out[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:  # files written by `zstd` tools may hold several frames, one after another
            if self.obj.eof:
                self.obj = self.dctx.decompressobj()
            parts.append(self.obj.decompress(data))
            self.started = not self.obj.eof
            data = self.obj.unused_data if self.obj.eof else b""
        return b"".join(parts)


def decompress_errors() -> tuple[type[BaseException], ...]:
    """What a damaged or truncated compressed stream raises while it is read."""
    try:
        import zstandard
    except ImportError:
        return _DECOMPRESS_ERRORS
    return (*_DECOMPRESS_ERRORS, zstandard.ZstdError)


@contextmanager
def open_binary(path: Path, on_read: Callable[[int], None] | None = None) -> Iterator[BinaryIO]:
    """`path`'s bytes, decompressed when its name says so; errors opening it are one line."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"expected a file, got a directory: {path}") from None
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied") from None
    with f:
        raw: BinaryIO = io.BufferedReader(_Counting(f, on_read), 1 << 20)  # type: ignore[arg-type]
        compression = split_suffix(path)[1]
        if compression is None:
            yield raw
            return
        opener = {"gzip": lambda: gzip.GzipFile(fileobj=raw), "bzip2": lambda: bz2.BZ2File(raw),
                  "xz": lambda: lzma.LZMAFile(raw), "zstd": lambda: io.BufferedReader(_Zstd(raw), 1 << 20)}
        with opener[compression]() as stream:
            yield stream


def read_or_fail(stream: BinaryIO, path: Path, size: int = -1, line: bool = False) -> bytes:
    """One read (or readline) of a possibly compressed stream; a damaged stream is one line."""
    try:
        return stream.readline() if line else stream.read(size)
    except decompress_errors() as e:
        what = split_suffix(path)[1]
        if what is None:
            raise
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} is not a valid {what} file or is truncated ({detail})") from None


@dataclass
class Records:
    """How records are read, and the bad ones counted while skipping."""

    text_field: str = "text"
    skip_bad: bool = False
    skipped: int = 0
    first_bad: str | None = None

    def bad(self, message: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{message} (pass --skip-bad-records to skip such records)")
        self.skipped += 1
        self.first_bad = self.first_bad or message


def iter_records(path: Path, records: Records,
                 on_read: Callable[[int], None] | None = None) -> Iterator[tuple[str, int]]:
    """(text, its UTF-8 byte count) for every good record of a JSON-lines or Parquet file."""
    if kind_of(path) == "parquet":
        source = _parquet_records(path, records, on_read)
    else:
        source = _json_records(path, records, on_read)
    has_text = False
    for text, nbytes in source:
        has_text = has_text or bool(text.strip())
        yield text, nbytes
    if not has_text:
        field = records.text_field
        raise DataError(f"{path} has no text in field {field!r}" if records.skipped == 0 else
                        f"{path} has no good records ({records.skipped} skipped; first: "
                        f"{records.first_bad})")


def _utf8_size(text: str, where: str, records: Records) -> int | None:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # JSON may escape a lone surrogate, which no UTF-8 text can hold
        records.bad(f"{where}: field {records.text_field!r} is not valid Unicode (a lone surrogate)")
        return None


def _json_records(path: Path, records: Records,
                  on_read: Callable[[int], None] | None) -> Iterator[tuple[str, int]]:
    field = records.text_field
    for obj, where in json_objects(path, records, on_read):
        if field not in obj:
            shown = ", ".join(list(obj)[:5]) or "none"
            hint = (" or pass --chat to train on its conversations" if "messages" in obj else "")
            records.bad(f"{where}: no field {field!r} (fields: {shown}); choose one with "
                        f"--text-field{hint}")
            continue
        text = obj[field]
        if not isinstance(text, str):
            kind = "null" if text is None else type(text).__name__
            records.bad(f"{where}: field {field!r} is {kind}, not a string")
            continue
        if (nbytes := _utf8_size(text, where, records)) is not None:
            yield text, nbytes


def json_objects(path: Path, records: Records,
                 on_read: Callable[[int], None] | None = None) -> Iterator[tuple[dict, str]]:
    """(object, "FILE line N") for every line of a JSON-lines file that holds a JSON object;
    malformed lines go to `records.bad`."""
    with open_binary(path, on_read) as f:
        lineno = 0
        while line := read_or_fail(f, path, line=True):
            lineno += 1
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue  # blank lines (a trailing one, above all) hold no record
            where = f"{path} line {lineno}"
            if lineno == 1 and line.lstrip().startswith(b"["):
                raise DataError(f"{path} is a JSON array, not JSON lines (one object per line); "
                                "convert it with: jq -c '.[]'")
            try:
                obj = json.loads(line.rstrip(b"\r\n"))
            except UnicodeDecodeError:
                records.bad(f"{where}: not valid UTF-8")
                continue
            except json.JSONDecodeError as e:
                records.bad(f"{where}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                records.bad(f"{where}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield obj, where


def _parquet_file(path: Path):  # noqa: ANN202 - pyarrow.parquet.ParquetFile, imported lazily
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading .parquet files needs pyarrow: {DATA_EXTRA}") from None
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"input file not found: {path}") from None
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for anything that is not Parquet
        raise DataError(f"{path} is not a valid Parquet file ({str(e).splitlines()[0]})") from None


def _parquet_records(path: Path, records: Records,
                     on_read: Callable[[int], None] | None) -> Iterator[tuple[str, int]]:
    import pyarrow as pa

    pf, field = _parquet_file(path), records.text_field
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path} has no column {field!r} (columns: {', '.join(schema.names[:8])}); "
                        "choose one with --text-field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text")
    total_rows = max(1, pf.metadata.num_rows)
    size = path.stat().st_size
    row = 0
    try:
        for batch in _batches(pf, field):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    records.bad(f"{path} row {row}: column {field!r} is null")
                elif (nbytes := _utf8_size(text, f"{path} row {row}", records)) is not None:
                    yield text, nbytes
            if on_read is not None:  # progress: the file's share of these rows
                on_read(size * batch.num_rows // total_rows)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is damaged at row {row + 1} ({str(e).splitlines()[0]})") from None


def _batches(pf, field: str):  # noqa: ANN001, ANN202 - pyarrow objects, imported lazily
    """The column's record batches, one row group at a time. One iter_batches over the whole
    file keeps buffers of the row groups already read alive (measured: the live pyarrow memory
    grew to the file's size); a fresh reader per row group frees them."""
    for group in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group],
                                   columns=[field], use_threads=False)
