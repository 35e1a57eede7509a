"""Byte-level models emit valid UTF-8: the engine's mask (minigpt/utf8.py) against models forced to
write an orphan continuation byte, a lead byte with no continuation, or end mid-character, and
against random generations of a bytes and a bpe model."""

from __future__ import annotations

import codecs

import pytest
import torch

from minigpt.cli import _sampling_from, build_parser
from minigpt.config import ModelConfig
from minigpt.engine import Engine
from minigpt.model import GPT
from minigpt.tokenization import train_tokenizer
from minigpt.tokenization.bytes import ByteTokenizer
from minigpt.utf8 import START, Utf8Mask, step

TEXTS = ["héllo wörld ", "日本語のテキスト ", "emoji 🙂🚀 ", "ascii only. ", "Ελληνικά ", "€ ∑ ≠ "]


def forced_model(preferences: dict[int, float], vocab: int = 258) -> GPT:
    """A GPT whose logits are `preferences` (token -> logit, others 0) whatever the input: the
    final LayerNorm's weight is 0, so its output is its bias, a unit vector e_0, and the head's
    first column holds the preferences."""
    cfg = ModelConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_embd=8, bias=True,
                      norm="layernorm", tie_embeddings=False, pos_emb="learned")
    model = GPT(cfg)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        for token, logit in preferences.items():
            model.lm_head.weight[token, 0] = logit
    return model


def strict_prefix(data: bytes) -> str:
    """Decode strictly, allowing only an unfinished last character (max_new_tokens can cut one)."""
    return codecs.getincrementaldecoder("utf-8")(errors="strict").decode(data, final=False)


def generated_bytes(engine: Engine, **settings) -> bytes:
    events = engine.stream("", **settings)
    return b"".join(engine.tokenizer.token_bytes(e.token) for e in events)


def test_the_automaton_follows_rfc_3629():
    for text in TEXTS + ["\U0010ffff", "\ud7ff", "\ue000", "\x7f"]:
        assert step(START, text.encode()) == START
    for bad in (b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80",
                b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xf5", b"\xff", b"\xe2a", b"\xe2\xe2"):
        assert step(START, bad) is None, bad
    assert step(START, b"\xe2\x82") not in (None, START)  # half of "€": a continuation is owed


def test_an_orphan_continuation_byte_is_never_sampled():
    # the model's favourite token is 0x80, a continuation byte; "a" comes second
    engine = Engine(forced_model({0x80: 10.0, ord("a"): 5.0}), ByteTokenizer())
    unmasked = engine.generate("", max_new_tokens=6, temperature=0, utf8_mask=False)
    assert unmasked == "\ufffd" * 6  # what the user saw before: replacement characters
    assert engine.generate("", max_new_tokens=6, temperature=0) == "aaaaaa"  # on by default


def test_a_started_character_is_finished_before_anything_else():
    # favourite: 0xE2, a three-byte lead; next "a". Unmasked: E2 E2 E2 ... (never valid).
    engine = Engine(forced_model({0xE2: 10.0, ord("a"): 5.0}), ByteTokenizer())
    data = generated_bytes(engine, max_new_tokens=9, temperature=0, stop_at_eos=False)
    assert data == b"\xe2\x80\x80" * 3  # continuations come (0x80, the first of equal logits)
    assert strict_prefix(data) == "\u2000" * 3
    raw = generated_bytes(engine, max_new_tokens=9, temperature=0, utf8_mask=False)
    with pytest.raises(UnicodeDecodeError):
        strict_prefix(raw)


def test_end_of_text_waits_for_the_character_to_finish():
    tok = ByteTokenizer()
    mask = Utf8Mask.for_tokenizer(tok, rows=2)
    mask.advance([0xE2, ord("a")])  # row 0 is inside a character, row 1 is not
    allowed = torch.isfinite(mask.apply(torch.zeros(2, tok.vocab_size)))
    assert allowed[1, tok.eos_id] and not allowed[0, tok.eos_id]
    assert allowed[0].nonzero().flatten().tolist() == list(range(0x80, 0xC0))
    mask.advance([0x82, 0xE2])
    mask.advance([0xAC, 0x82])  # row 0 finished "€"
    allowed = torch.isfinite(mask.apply(torch.zeros(2, tok.vocab_size)))
    assert allowed[0, tok.eos_id] and not allowed[1, tok.eos_id]


@pytest.fixture(scope="module")
def random_models():
    torch.manual_seed(0)
    bpe = train_tokenizer("bpe", TEXTS * 20, vocab_size=300)
    out = []
    for tok in (ByteTokenizer(), bpe):
        model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                                n_embd=16))
        out.append(Engine(model, tok))
    return out


def test_random_generations_always_decode_as_strict_utf8(random_models):
    for engine in random_models:
        unmasked_bad = 0
        for seed in range(12):
            settings = dict(max_new_tokens=40, temperature=1.5, seed=seed, stop_at_eos=False)
            events = list(engine.stream("", **settings))
            data = b"".join(engine.tokenizer.token_bytes(e.token) for e in events)
            text = strict_prefix(data)  # raises on any invalid byte
            assert "".join(e.text for e in events) == text and "\ufffd" not in text
            try:
                strict_prefix(generated_bytes(engine, **settings, utf8_mask=False))
            except UnicodeDecodeError:
                unmasked_bad += 1
        assert unmasked_bad > 0, f"{engine.tokenizer.kind}: the test shows nothing without the mask"


def test_the_mask_leaves_a_char_model_alone_and_the_cli_flag_turns_it_off():
    from minigpt.tokenization import CharTokenizer

    engine = Engine(GPT(ModelConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8)),
                    CharTokenizer.train(["abcdef"]))
    assert not engine.utf8_masking(_sampling_from(build_parser().parse_args(["sample", "r"])))
    assert engine.generate("a", max_new_tokens=10, seed=1) == engine.generate(
        "a", max_new_tokens=10, seed=1, utf8_mask=True)
    args = build_parser().parse_args(["sample", "r", "--no-utf8-mask"])
    assert _sampling_from(args).utf8_mask is False
    assert build_parser().parse_args(["serve", "r", "--no-utf8-mask"]).utf8_mask is False
    assert build_parser().parse_args(["serve", "r"]).utf8_mask is None


def test_the_server_masks_by_default_and_not_with_no_utf8_mask():
    import httpx

    from minigpt.serve.app import create_app
    from minigpt.serve.logprobs import name
    from test_server import serving

    engine = Engine(forced_model({0x80: 10.0, ord("a"): 5.0}), ByteTokenizer())
    body = {"prompt": "", "max_tokens": 4, "temperature": 0, "logprobs": 1}
    for utf8_mask, text in ((None, "aaaa"), (False, "\ufffd" * 4)):
        with serving(create_app(engine, utf8_mask=utf8_mask)) as url:
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
        choice = r["choices"][0]
        assert choice["text"] == text
        # the orphan byte is named the way OpenAI names a token that is not whole characters
        assert choice["logprobs"]["tokens"][0] == ("a" if utf8_mask is None else "bytes:\\x80")
    assert name(ByteTokenizer(), 0xC3) == ("bytes:\\xc3", b"\xc3")
