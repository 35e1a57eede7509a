import json

import pytest

from minigpt.errors import TokenizerError
from minigpt.tokenization import CharTokenizer, load_tokenizer, save_tokenizer


def test_round_trip_including_non_ascii(tmp_path):
    text = "Héllo, wörld! 你好 — ✓\n"
    tok = CharTokenizer.train([text])
    assert tok.decode(tok.encode(text)) == text
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(text) == tok.encode(text)
    assert json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["type"] == "char"


def test_bos_eos_are_distinct_specials_that_decode_to_nothing():
    tok = CharTokenizer.train(["abc"])
    assert tok.vocab_size == 5
    assert {tok.bos_id, tok.eos_id} == {3, 4}
    assert tok.decode([tok.bos_id, 0, 1, tok.eos_id]) == "ab"
    assert tok.token_bytes(tok.eos_id) == b""


def test_unknown_characters_are_named():
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(TokenizerError, match=r"'z'"):
        tok.encode("abz")
