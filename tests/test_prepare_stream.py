"""Streaming `prepare`: reading in chunks changes nothing a user can see. The same documents, the
same split (stream: the last val_fraction of the text by position; documents: seeded, by document),
the same errors, and byte counts that match the text, whatever the chunk size."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt.data import corpus as text_stream
from minigpt.data import prepare as prepare_mod
from minigpt.data.corpus import iter_documents, read_chunks
from minigpt.data.dataset import load_prepared
from minigpt.data.prepare import prepare
from minigpt.errors import DataError

TRICKY = ["a", "b c", "\n", "\n\n", " \n", "\r\n", "\t\n \n", "\u2028", "\x0b", "é", "中", "𝄞",
          "\r", "   ", "\x1c", "\u3000", "\n \t \n\n"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few bytes, so every boundary case (cut lines, cut characters) happens."""
    def set_size(n: int) -> None:
        monkeypatch.setattr(text_stream, "CHUNK_BYTES", n)
        monkeypatch.setattr(prepare_mod, "PIECE_CHARS", max(1, n // 2))
        monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 3 * n)
    set_size(5)
    return set_size


def reference_documents(texts: list[str], mode: str) -> list[str]:
    """The documented meaning of each mode, on whole texts in memory."""
    if mode == "lines":
        docs = [line.strip() for t in texts for line in t.splitlines()]
    elif mode == "blank":
        docs = [d.strip() for t in texts for d in re.split(r"\n[ \t\r\f\v]*\n", t)]
    else:
        docs = [t.strip() for t in texts]
    return [d for d in docs if d]


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from(TRICKY), min_size=1, max_size=40).map("".join),
                      min_size=1, max_size=3),
       chunk=st.sampled_from([1, 2, 3, 5, 8, 64]),
       mode=st.sampled_from(["lines", "blank", "files"]))
def test_documents_do_not_depend_on_chunk_size(tmp_path_factory, texts, chunk, mode):
    texts = [t if t.strip() else t + "x" for t in texts]  # whitespace-only files are refused
    d = tmp_path_factory.mktemp("docs")
    files = []
    for i, t in enumerate(texts):
        files.append(d / f"{i}.txt")
        files[-1].write_bytes(t.encode("utf-8"))
    old = text_stream.CHUNK_BYTES
    text_stream.CHUNK_BYTES = chunk
    try:
        assert list(iter_documents(files, mode)) == reference_documents(texts, mode)
    finally:
        text_stream.CHUNK_BYTES = old


def test_chunks_never_split_a_character_and_end_at_newlines(tmp_path):
    path = tmp_path / "t.txt"
    text = "Καλημέρα\n" * 3 + "𝄞" * 10 + "\nend"
    path.write_text(text, encoding="utf-8")
    chunks = list(read_chunks(path, chunk_bytes=20))  # a Greek line is 17 bytes, the 𝄞 line 40
    assert "".join(c.text for c in chunks) == text
    assert all(c.nbytes == len(c.text.encode()) for c in chunks)
    assert [c.text for c in chunks[:3]] == ["Καλημέρα\n"] * 3  # lines that fit a chunk stay whole
    # a line longer than a chunk is cut between two 4-byte characters (29 bytes held: 7 whole ones)
    assert [c.text for c in chunks[3:]] == ["𝄞" * 7, "𝄞" * 3 + "\n", "end"]


@pytest.mark.parametrize("kind", ["char", "bytes", "bpe"])
def test_stream_split_is_the_last_fraction_of_the_text(tmp_path, small_chunks, kind):
    text = "ROMEO: Καλημέρα, 春眠不觉晓!\nJULIET: 𝄞 and more words here.\n" * 7
    (tmp_path / "in.txt").write_text("\ufeff" + text, encoding="utf-8")  # the BOM is not text
    options = {"vocab_size": 300} if kind == "bpe" else {}
    meta = prepare([tmp_path / "in.txt"], tmp_path / "out", val_fraction=0.3, tokenizer=kind,
                   progress=False, **options)
    cut = int(len(text) * 0.7)
    data = load_prepared(tmp_path / "out")
    assert data.tokenizer.decode(np.asarray(data.train)) == text[:cut]
    assert data.tokenizer.decode(np.asarray(data.val)) == text[cut:]
    assert meta["train_bytes"] == len(text[:cut].encode()) and meta["val_bytes"] == len(text[cut:].encode())
    assert (meta["train_tokens"], meta["val_tokens"]) == (data.train.size, data.val.size)


def test_document_split_is_seeded_and_by_document(tmp_path, small_chunks):
    lines = [f"name{i} Ωμέγα" for i in range(40)]
    (tmp_path / "names.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def val_docs(seed: int, out: str) -> list[str]:
        prepare([tmp_path / "names.txt"], tmp_path / out, docs="lines", tokenizer="bytes", seed=seed,
                val_fraction=0.25, progress=False)
        d = load_prepared(tmp_path / out)
        ids = np.asarray(d.val).tolist()
        assert ids[0] == d.tokenizer.bos_id and ids[-1] == d.tokenizer.eos_id
        # each document is encoded in several pieces here, yet wrapped exactly once
        assert ids.count(d.tokenizer.bos_id) == ids.count(d.tokenizer.eos_id) == 10
        text = d.tokenizer.decode(ids)  # BOS/EOS dropped: documents run together
        return [doc for doc in lines if doc in text]

    first, again, other = val_docs(1, "a"), val_docs(1, "b"), val_docs(2, "c")
    assert len(first) == 10 and first == again != other
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["num_docs"] == {"train": 30, "val": 10}
    assert meta["val_bytes"] == sum(len(d.encode()) for d in first)


def test_bad_utf8_is_reported_at_its_file_offset_even_past_the_first_chunk(tmp_path, small_chunks):
    path = tmp_path / "bad.txt"
    path.write_bytes("Καλημέρα κόσμε\n".encode() * 4 + b"ok \xff\n")
    offset = len("Καλημέρα κόσμε\n".encode()) * 4 + 3
    with pytest.raises(DataError, match=f"not valid UTF-8 \\(bad byte at offset {offset}\\)"):
        prepare([path], tmp_path / "out", progress=False)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"ab\x00cd", "binary"), (b" \n\t\n", "only whitespace"),
])
def test_unusable_files_are_refused(tmp_path, content, message):
    (tmp_path / "x.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare([tmp_path / "x.txt"], tmp_path / "out", progress=False)


def test_a_failed_prepare_keeps_the_previous_data(tmp_path, small_chunks):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("hello world\n" * 20)
    prepare([good], tmp_path / "out", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad.write_bytes(b"hello world\n" * 20 + b"\xc3")  # truncated character at the very end
    with pytest.raises(DataError, match="not valid UTF-8"):
        prepare([good, bad], tmp_path / "out", tokenizer="bytes", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_prepared_bpe_data_is_deterministic(tmp_path):
    (tmp_path / "in.txt").write_text("the cat sat on the mat; the dog sat on the log.\n" * 50)
    for out in ("a", "b"):
        prepare([tmp_path / "in.txt"], tmp_path / out, tokenizer="bpe", vocab_size=280, progress=False)
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
