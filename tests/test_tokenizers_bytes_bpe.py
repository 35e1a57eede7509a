"""The bytes and bpe tokenizers: any Unicode round-trips, BPE training is deterministic, and the file
format (tokenizer.json with the Hugging Face JSON inside) loads back to the same tokenizer."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt.errors import TokenizerError
from minigpt.tokenization import (
    BPETokenizer,
    ByteTokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "Καλημέρα κόσμε! Η γλώσσα μου έδωσαν ελληνική.\n",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n",
] * 20


@cache
def bpe(vocab_size: int = 320) -> BPETokenizer:
    return train_tokenizer("bpe", CORPUS, vocab_size=vocab_size)


def test_bpe_learns_merges_and_compresses_its_corpus():
    tok = bpe()
    assert 258 < tok.vocab_size <= 320
    text = "".join(CORPUS[:3])
    assert len(tok.encode(text)) < 0.7 * len(text.encode("utf-8"))
    assert {tok.bos_id, tok.eos_id} == {0, 1}


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bytes_round_trips_any_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.encode_batch([text])[0].tolist() == ids


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_unicode(text):
    tok = bpe()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.encode_batch([text])[0].tolist() == ids
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_special_token_text_in_the_corpus_is_plain_text():
    for tok in (bpe(), ByteTokenizer()):
        ids = tok.encode("a <|bos|> b <|eos|>")
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == "a <|bos|> b <|eos|>"


def test_bpe_training_is_deterministic_and_follows_vocab_size():
    a = train_tokenizer("bpe", iter(CORPUS), vocab_size=300)
    b = train_tokenizer("bpe", list(CORPUS), vocab_size=300)
    assert a.to_dict() == b.to_dict()
    c = train_tokenizer("bpe", CORPUS, vocab_size=280)
    assert c.vocab_size == 280 < a.vocab_size
    # the first merges agree: a larger vocabulary only adds merges at the end
    assert c.to_dict()["hf"]["model"]["merges"] == a.to_dict()["hf"]["model"]["merges"][:280 - 258]


def test_bpe_tokens_split_a_rare_character_into_its_bytes():
    tok = bpe()
    ids = tok.encode("𝄞")  # never seen in training: 4 UTF-8 bytes, no merge covers them
    assert len(ids) > 1
    assert b"".join(tok.token_bytes(i) for i in ids) == "𝄞".encode()
    assert tok.token_bytes(tok.bos_id) == b"" == tok.token_bytes(tok.eos_id)


@pytest.mark.parametrize("tok", [ByteTokenizer(), bpe()], ids=["bytes", "bpe"])
def test_tokenizer_json_round_trip(tmp_path, tok):
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    d = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert d["type"] == tok.kind
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert type(loaded) is type(tok)
    assert loaded.to_dict() == tok.to_dict()
    text = "ROMEO: Καλημέρα 春眠 𝄞"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.vocab_size == tok.vocab_size


def test_bpe_json_is_the_hugging_face_format(tmp_path):
    from tokenizers import Tokenizer as HF

    hf = HF.from_str(json.dumps(bpe().to_dict()["hf"]))
    assert hf.get_vocab_size() == bpe().vocab_size
    assert hf.encode("ROMEO: hear me", add_special_tokens=False).ids == bpe().encode("ROMEO: hear me")


def test_malformed_bpe_file_is_a_clear_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"type": "bpe", "hf": {"model": "nonsense"}}))
    with pytest.raises(TokenizerError, match="malformed"):
        load_tokenizer(path)


def test_vocab_size_is_validated_per_kind():
    with pytest.raises(TokenizerError, match="between 258"):
        train_tokenizer("bpe", CORPUS, vocab_size=100)
    for kind in ("char", "bytes"):
        with pytest.raises(TokenizerError, match="bpe tokenizer only"):
            train_tokenizer(kind, CORPUS, vocab_size=512)


def test_lone_surrogates_are_refused_clearly():
    for tok in (ByteTokenizer(), bpe()):
        with pytest.raises(TokenizerError):
            tok.encode("a\ud800b")


def test_char_encode_batch_matches_encode_and_names_unknown_characters():
    tok = train_tokenizer("char", ["hello wörld"])
    assert tok.encode_batch(["wörld", ""])[0].tolist() == tok.encode("wörld")
    assert tok.encode_batch([""])[0].size == 0
    assert isinstance(tok.encode_batch(["ll"])[0], np.ndarray)
    with pytest.raises(TokenizerError, match="'z'"):
        tok.encode_batch(["hez"])
