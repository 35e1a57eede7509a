"""The server's inspect view: POST /v1/inspect answers Engine.inspect's arrays behind the API key,
and /inspect (linked from the playground) draws them in a real Chromium for text the user types."""

from __future__ import annotations

import httpx
import pytest

from conftest import CORPUS, TINY
from minigpt import load, train
from minigpt.serve.app import create_app
from test_inspect import CHROMIUM, CHROMIUM_ARGS, needs_chromium
from test_server import serving

KEY = "sk-inspect"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect-serve")
    (tmp / "corpus.txt").write_text(CORPUS)
    train(data=str(tmp / "corpus.txt"), out=str(tmp / "run"), progress=False, device="cpu",
          max_iters=10, eval_interval=10, **TINY)
    return load(tmp / "run", device="cpu")


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine, api_key=KEY)) as base:
        yield base


def post(url: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/inspect", json=body, headers=headers, timeout=60)


def test_endpoint_answers_the_engines_arrays(url, engine):
    r = post(url, {"text": "All:\nSpeak", "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    local = engine.inspect("All:\nSpeak", top_k=3)
    assert body["tokens"] == local.tokens and body["pieces"] == local.pieces
    assert body["prob"][0] is None  # the first character is only read
    assert body["surprise"][1:] == pytest.approx(local.surprise[1:].tolist(), abs=1e-4)
    assert len(body["top_pieces"][1]) == 3
    n_layer, n_head = TINY["n_layer"], TINY["n_head"]
    assert [len(body["attention"]), len(body["attention"][0])] == [n_layer, n_head]
    assert body["mean_surprise"] == pytest.approx(local.mean_surprise, abs=1e-4)


@pytest.mark.parametrize("body, key, status, param", [
    ({"text": "All"}, None, 401, None),
    ({"text": "All"}, "sk-wrong", 401, None),
    ({"text": ""}, KEY, 400, "text"),
    ({"text": "Ünï"}, KEY, 400, "text"),
    ({"text": "a" * 40}, KEY, 400, "text"),
    ({"text": 3}, KEY, 400, "text"),
    ({"text": "All", "top_k": 0}, KEY, 400, "top_k"),
])
def test_bad_requests_get_an_error_naming_the_field(url, body, key, status, param):
    r = post(url, body, key)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


@needs_chromium
def test_the_playground_links_to_an_inspect_page_that_draws_typed_text(url, engine):
    from playwright.sync_api import expect, sync_playwright

    text = "First Citizen:"
    errors: list[str] = []
    failed: list[tuple[str, int]] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            # failed loads are checked by URL below; the console message does not name the URL
            page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                    and not m.text.startswith("Failed to load resource") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("response", lambda r: failed.append((r.url, r.status)) if r.status >= 400
                    else None)
            page.goto(url)
            page.click("#inspect-link")
            expect(page.locator("#text")).to_be_visible()
            page.fill("#text", text)
            page.fill("#api-key", KEY)
            page.click("#inspect")
            expect(page.locator("#status")).to_have_text("done", timeout=30_000)
            expect(page.locator("#tokens .tok")).to_have_count(len(engine.inspect(text).tokens))
            page.hover("#surprise .seg >> nth=3")
            expect(page.locator("#details")).to_contain_text("the model expected")
            page.fill("#text", "")
            page.click("#inspect")
            expect(page.locator("#status")).to_contain_text("the text is empty")
        finally:
            browser.close()
    assert errors == []
    # the one failed request is the empty text's 400 (the playground has no favicon: not ours)
    assert [f for f in failed if not f[0].endswith("/favicon.ico")] == [(f"{url}/v1/inspect", 400)]


def test_page_is_served_without_a_key(url):
    r = httpx.get(f"{url}/inspect", timeout=30)
    assert r.status_code == 200 and 'id="inspect-data"' in r.text
