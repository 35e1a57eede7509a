"""`minigpt inspect` and `Engine.inspect`: the attention the model returns is the attention it uses,
surprise is the loss in bits, every tokenizer's tokens map back onto the text, and the written page
opens in a real Chromium with one token element per token."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, TINY, run_cli
from minigpt import ModelConfig, load, train
from minigpt.engine import Engine
from minigpt.errors import DataError, TokenizerError
from minigpt.model import GPT
from minigpt.tokenization.bpe import BPETokenizer
from minigpt.tokenization.bytes import ByteTokenizer
from minigpt.tokenization.char import CharTokenizer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)")


def random_model(arch: str, vocab: int, **over) -> GPT:
    """A small model with every weight random, including the (zero-initialised) untied head, so
    logits and attention are far from uniform."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=16, block_size=32,
                            vocab_size=vocab, **over))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_returned_attention_is_causal_rows_of_weights_and_changes_no_logit(arch):
    model = random_model(arch, vocab=11)
    idx = torch.randint(0, 11, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, _ = model(idx)
        logits, _, att = model(idx, return_attention=True)
    assert att.shape == (2, 3, 2, 20, 20)  # (n_layer, B, n_head, T, T)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 3, 2, 20))
    assert torch.all(att.triu(1) == 0)  # nothing attends to the future
    assert att[..., 5, :6].max() < 1  # and the weights are spread, not one-hot: a real test
    # a head's first token can only attend to itself
    assert torch.all(att[..., 0, 0] == 1)


def test_attention_with_a_kv_cache_is_refused():
    from minigpt.kv_cache import KVCache

    model = random_model("gpt2", vocab=11)
    with pytest.raises(ValueError, match="cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=KVCache.for_model(model, 1),
              return_attention=True)


def char_engine(arch: str = "modern", bos: bool = False) -> Engine:
    tok = CharTokenizer(sorted(set(CORPUS)))
    return Engine(random_model(arch, tok.vocab_size), tok, bos_prompts=bos)


@pytest.mark.parametrize("bos", [False, True], ids=["stream", "documents"])
def test_mean_surprise_in_nats_is_the_models_loss_on_the_text(bos):
    engine = char_engine(bos=bos)
    text = "All:\nSpeak, speak."
    r = engine.inspect(text, top_k=3)
    ids = torch.tensor([r.tokens])
    _, loss = engine.model(ids[:, :-1], ids[:, 1:])
    assert r.mean_surprise * math.log(2) == pytest.approx(loss.item(), rel=1e-5)
    assert r.scored.sum() == len(text) - (0 if bos else 1)  # after BOS every character is predicted
    assert (r.tokens[0] == engine.tokenizer.bos_id) == bos
    s = r.surprise[r.scored]
    assert r.prob[r.scored] == pytest.approx(2.0 ** -s)
    # the top-k are the likeliest tokens, likeliest first, and a token's p is at most the top one
    assert (r.top_probs[1:, :-1] >= r.top_probs[1:, 1:]).all()
    assert (r.prob[1:] <= r.top_probs[1:, 0] + 1e-6).all()
    assert r.attention.shape == (2, 2, len(r.tokens), len(r.tokens))


def test_bytes_tokens_inside_a_character_make_one_segment_with_their_summed_surprise():
    tok = ByteTokenizer()
    engine = Engine(random_model("gpt2", tok.vocab_size), tok)
    text = "né €!"
    r = engine.inspect(text)
    assert r.pieces == ["n", "\\xc3", "\\xa9", " ", "\\xe2", "\\x82", "\\xac", "!"]
    assert [s.text for s in r.segments] == list(text)
    euro = r.segments[3]
    assert (euro.first, euro.last) == (4, 6)
    assert euro.surprise == pytest.approx(r.surprise[4:7].sum())


def test_bpe_tokens_are_shown_as_the_text_they_cover():
    tok = BPETokenizer.train([CORPUS], vocab_size=300)
    engine = Engine(random_model("gpt2", tok.vocab_size), tok)
    text = "First Citizen: speak, café"
    r = engine.inspect(text)
    assert len(r.tokens) < len(text.encode())  # merges happened
    assert "".join(s.text for s in r.segments) == text
    assert all(p in text for p in r.pieces if "\\x" not in p)  # whole characters: real text
    joined = b"".join(tok.token_bytes(t) for t in r.tokens)
    assert joined == text.encode()


def test_markup_in_the_text_cannot_break_out_of_the_pages_data_block():
    from minigpt.tools.inspect_report import DATA_BLOCK, render_html

    tok = ByteTokenizer()
    text = "a</script><!--<b>x"
    page = render_html(Engine(random_model("gpt2", tok.vocab_size), tok).inspect(text))
    start = DATA_BLOCK.split("null")[0]
    payload = page.split(start)[1].split("</script>")[0]
    assert "<" not in payload and json.loads(payload)["text"] == text


@pytest.mark.parametrize("text, error, message", [
    ("", DataError, "the text is empty"),
    ("A", DataError, "one token"),
    ("a" * 40, DataError, "at most 32"),
    ("Ünï", TokenizerError, "never seen"),
])
def test_texts_that_cannot_be_inspected_raise_one_line_errors(text, error, message):
    with pytest.raises(error, match=message):
        char_engine().inspect(text)


# --- the CLI and the page --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("inspect")
    (tmp / "corpus.txt").write_text(CORPUS)
    train(data=str(tmp / "corpus.txt"), out=str(tmp / "run"), progress=False, device="cpu",
          max_iters=20, eval_interval=20, **{**TINY, "n_layer": 3})
    return tmp / "run"


TEXT = "First Citizen:\nSpeak, speak."


def test_cli_writes_page_json_and_one_heatmap_per_layer(tiny_run, tmp_path):
    out = tmp_path / "report"
    proc = run_cli("inspect", str(tiny_run), "--text", TEXT[:16], "--out", str(out), check=True)
    assert "mean surprise" in proc.stdout and "bits/token" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "attention-layer0.png", "attention-layer1.png", "attention-layer2.png",
        "inspect.html", "inspect.json"]
    data = json.loads((out / "inspect.json").read_text())
    assert len(data["tokens"]) == 16 and len(data["attention"]) == 3
    assert (out / "attention-layer0.png").read_bytes()[:4] == b"\x89PNG"
    assert "http" not in (out / "inspect.html").read_text().split("<script")[1]  # nothing fetched


@needs_chromium
def test_the_page_opens_in_chromium_shows_every_token_and_the_attention_of_the_hovered_one(
        tiny_run, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from minigpt.tools.inspect_report import write_report

    engine = load(tiny_run, device="cpu")
    result = engine.inspect(TEXT[:16])
    page_path = write_report(result, tmp_path, layer=1, head=1)[0]
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            expect(page.locator("#tokens .tok")).to_have_count(len(result.tokens))
            expect(page.locator("#surprise .seg")).to_have_count(len(result.segments))
            assert page.locator("#surprise").text_content().replace("↵", "") == TEXT[:16]
            assert page.locator("#layer").input_value() == "1"
            page.hover("#tokens .tok >> nth=5")
            expect(page.locator("#details")).to_contain_text("token 5")
            shaded = page.locator("#tokens .tok").evaluate_all(
                "els => els.map(e => e.style.background !== '')")
            future = page.locator("#tokens .tok.future").count()
        finally:
            browser.close()
    assert errors == []
    assert shaded == [j <= 5 for j in range(len(result.tokens))]  # itself and earlier tokens only
    assert future == len(result.tokens) - 6
