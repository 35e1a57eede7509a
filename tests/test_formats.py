"""Input formats: JSON lines, Parquet and compressed files prepare to exactly the token ids (and
byte counts, for bits per byte) of the equivalent .txt; a record is one document; bad records are
one line naming file and line, or skipped and counted with --skip-bad-records."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import cli_harness
from minigpt.data.dataset import load_prepared
from minigpt.data.prepare import prepare
from minigpt.errors import DataError

LINES = [f"{i}: {'Ünïcode 中文 𝄞' if i % 7 == 0 else 'plain words'} line" for i in range(300)]
TEXT = "\n".join(LINES) + "\n"  # what a file of one-line records reads as, in stream mode
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}


def jsonl_bytes(texts: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)).encode()


def write(path: Path, texts: list[str] = LINES) -> Path:
    """`texts` in the format `path`'s name says."""
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path,
                       row_group_size=64)  # several row groups, read batch by batch
        return path
    suffix = next((s for s in COMPRESS if name.endswith(s)), "")
    base = name.removesuffix(suffix)
    raw = jsonl_bytes(texts) if base.endswith((".jsonl", ".json")) else ("\n".join(texts) + "\n").encode()
    path.write_bytes(COMPRESS[suffix](raw) if suffix else raw)
    return path


def prepared(inputs: list[Path], out: Path, **kwargs) -> tuple[dict, bytes, bytes]:
    meta = prepare(inputs, out, progress=False, **kwargs)
    return meta, (out / "train.bin").read_bytes(), (out / "val.bin").read_bytes()


def same_as_text(meta: dict, train: bytes, val: bytes, ref: tuple[dict, bytes, bytes]) -> None:
    ref_meta, ref_train, ref_val = ref
    assert train == ref_train and val == ref_val
    keys = ("vocab_size", "train_tokens", "val_tokens", "train_bytes", "val_bytes", "num_docs")
    assert {k: meta[k] for k in keys} == {k: ref_meta[k] for k in keys}


@pytest.mark.parametrize("docs", [None, "lines"])
@pytest.mark.parametrize("name", ["c.jsonl", "c.json", "c.parquet", "c.txt.gz", "c.txt.bz2",
                                  "c.txt.xz", "c.txt.zst", "c.jsonl.gz", "c.jsonl.zst"])
def test_each_format_prepares_to_the_token_ids_of_the_equivalent_txt(tmp_path, name, docs):
    ref = prepared([write(tmp_path / "c.txt")], tmp_path / "ref", docs=docs)
    meta, train, val = prepared([write(tmp_path / name)], tmp_path / "out", docs=docs)
    same_as_text(meta, train, val, ref)
    if docs is None:  # bits per byte: the bytes are the text's, whatever the container
        assert meta["train_bytes"] + meta["val_bytes"] == len(TEXT.encode("utf-8"))


def test_a_record_is_one_document_even_with_newlines_inside(tmp_path):
    texts = ["first story\n\nwith a blank line", "second", "third\nline", "fourth"]
    (tmp_path / "s.jsonl").write_bytes(jsonl_bytes(texts))
    for mode in ("lines", "blank", "files"):
        meta = prepare([tmp_path / "s.jsonl"], tmp_path / mode, docs=mode, val_fraction=0.25,
                       progress=False)
        assert meta["num_docs"] == {"train": 3, "val": 1}
    data = load_prepared(tmp_path / "lines")
    tok, docs, current = data.tokenizer, [], []
    for i in data.train.tolist() + data.val.tolist():
        if i == tok.eos_id:
            docs.append(tok.decode(current))
            current = []
        elif i != tok.bos_id:
            current.append(i)
    assert sorted(docs) == sorted(texts)


def test_a_directory_mixes_formats_and_ignores_json_settings_files(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    write(d / "a.txt", LINES[:100])
    write(d / "b.jsonl.gz", LINES[100:200])
    write(d / "c.parquet", LINES[200:])
    (d / "meta.json").write_text('{"not": "a corpus"}\n')  # e.g. a data dir's own files
    (d / "notes.part").write_text("an unfinished download\n")
    ref = prepared([write(tmp_path / "all.txt")], tmp_path / "ref", docs="lines")
    meta, train, val = prepared([d], tmp_path / "out", docs="lines")
    same_as_text(meta, train, val, ref)
    assert [Path(s).name for s in meta["sources"]] == ["a.txt", "b.jsonl.gz", "c.parquet"]


def test_text_field_picks_another_key_or_column(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(jsonl_bytes(LINES, field="body"))
    pq.write_table(pa.table({"body": LINES}), tmp_path / "c.parquet")
    ref = prepared([write(tmp_path / "c.txt")], tmp_path / "ref")
    for name in ("c.jsonl", "c.parquet"):
        same_as_text(*prepared([tmp_path / name], tmp_path / name.replace(".", "-"),
                               text_field="body"), ref)


def bad_jsonl(tmp_path: Path) -> Path:
    lines = [json.dumps({"text": t}) for t in LINES[:50]]
    lines[9] = '{"text": "unterminated'  # line 10
    lines[19] = json.dumps({"body": "no text field"})  # line 20
    lines[29] = json.dumps({"text": None})  # line 30
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def one_line_error(result: cli_harness.Result) -> str:
    assert result.rc == 1 and "Traceback" not in result.stderr, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minigpt: error: "), result.stderr
    return lines[0]


def test_a_malformed_line_names_its_line_number_and_leaves_no_data(tmp_path):
    bad_jsonl(tmp_path)
    line = one_line_error(cli_harness.run(["prepare", "bad.jsonl", "--out", "d"], tmp_path))
    assert line == ("minigpt: error: bad.jsonl line 10: not valid JSON (Unterminated string starting "
                    "at column 10) (pass --skip-bad-records to skip such records)")
    assert not (tmp_path / "d" / "train.bin").exists() and not (tmp_path / "d" / "meta.json").exists()


def test_a_missing_field_names_the_field(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(jsonl_bytes(LINES[:5], field="body"))
    line = one_line_error(cli_harness.run(["prepare", "c.jsonl", "--out", "d"], tmp_path))
    assert line == ("minigpt: error: c.jsonl line 1: no field 'text' (fields: id, body); choose one "
                    "with --text-field (pass --skip-bad-records to skip such records)")
    pq.write_table(pa.table({"body": LINES[:5]}), tmp_path / "c.parquet")
    line = one_line_error(cli_harness.run(["prepare", "c.parquet", "--out", "d"], tmp_path))
    assert line == ("minigpt: error: c.parquet has no column 'text' (columns: body); choose one with "
                    "--text-field")


def test_skip_bad_records_counts_them_and_keeps_the_rest(tmp_path):
    bad_jsonl(tmp_path)
    result = cli_harness.run(["prepare", "bad.jsonl", "--out", "d", "--skip-bad-records"], tmp_path)
    assert result.rc == 0, result
    assert result.stderr.splitlines() == ["skipped 3 bad record(s); the first: bad.jsonl line 10: "
                                          "not valid JSON (Unterminated string starting at column 10)"]
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["skipped_records"] == 3
    good = [t for i, t in enumerate(LINES[:50]) if i not in (9, 19, 29)]
    ref = prepared([write(tmp_path / "good.txt", good)], tmp_path / "ref")
    assert (tmp_path / "d" / "train.bin").read_bytes() == ref[1]
    assert (tmp_path / "d" / "val.bin").read_bytes() == ref[2]


def test_null_in_parquet_names_the_row(tmp_path):
    pq.write_table(pa.table({"text": ["a b c", None, "d e f"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet row 2: column 'text' is null"):
        prepare([tmp_path / "n.parquet"], tmp_path / "d", progress=False)
    meta = prepare([tmp_path / "n.parquet"], tmp_path / "d", progress=False, skip_bad_records=True)
    assert meta["skipped_records"] == 1


@pytest.mark.parametrize("name, message", [
    ("t.txt.gz", "t.txt.gz is not a valid gzip file or is truncated"),
    ("t.jsonl.zst", "t.jsonl.zst is not a valid zstd file or is truncated"),
    ("t.txt.xz", "t.txt.xz is not a valid xz file or is truncated"),
])
def test_a_truncated_compressed_file_is_one_line(tmp_path, name, message):
    whole = write(tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(whole[: len(whole) // 2])
    line = one_line_error(cli_harness.run(["prepare", name, "--out", "d"], tmp_path))
    assert line.startswith(f"minigpt: error: {message} (")


def test_a_json_array_is_told_apart_from_json_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in LINES[:3]], indent=1))
    line = one_line_error(cli_harness.run(["prepare", "a.json", "--out", "d"], tmp_path))
    assert line == ("minigpt: error: a.json is a JSON array, not JSON lines (one object per line); "
                    "convert it with: jq -c '.[]'")


def test_train_data_reads_jsonl_with_its_text_field(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(jsonl_bytes(LINES, field="body"))
    tiny = ("--n-layer 1 --n-head 2 --n-embd 16 --block-size 16 --batch-size 4 --eval-iters 1 "
            "--sample-tokens 0 --max-iters 2 --eval-interval 2 --quiet").split()
    result = cli_harness.run(["train", "--data", "c.jsonl", "--text-field", "body", "--out", "run",
                              *tiny], tmp_path)
    assert result.rc == 0, result
    ref = prepared([write(tmp_path / "c.txt")], tmp_path / "ref")
    assert (tmp_path / "run" / "data" / "train.bin").read_bytes() == ref[1]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["text_field"] == "body"


def test_a_zst_file_of_several_frames_reads_whole(tmp_path):
    zc = zstandard.ZstdCompressor()
    half = len(TEXT) // 2
    (tmp_path / "c.txt.zst").write_bytes(zc.compress(TEXT[:half].encode()) + zc.compress(TEXT[half:].encode()))
    ref = prepared([write(tmp_path / "c.txt")], tmp_path / "ref")
    same_as_text(*prepared([tmp_path / "c.txt.zst"], tmp_path / "out"), ref)
