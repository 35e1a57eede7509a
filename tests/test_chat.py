"""/v1/chat/completions and `logprobs` on a real uvicorn server, through the official `openai`
client: the reply is the model's continuation of the rendered template, cut at the template's stop
strings; logprobs equal a log-softmax computed here from the model's own logits; malformed
messages and random JSON (hypothesis) get a 4xx OpenAI-style error, never a 5xx."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt import load, train
from minigpt.chat_template import DEFAULT, ChatTemplate, load_template
from minigpt.cli import main
from minigpt.serve.app import create_app
from minigpt.tokenization.base import BOS
from test_server import CHROMIUM, CHROMIUM_ARGS, serving

KEY = "sk-chat"
CORPUS = "".join(
    f"System: be kind\nUser: hello {i % 9}\nAssistant: hi, the cat sat {i % 5}.\n" for i in range(80)
)
MESSAGES = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello 3"}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    (tmp / "corpus.txt").write_text(CORPUS)
    out = tmp / "chat"
    train(data=str(tmp / "corpus.txt"), out=str(out), progress=False, device="cpu", n_layer=2,
          n_head=4, n_embd=32, block_size=64, max_iters=30, batch_size=8, eval_interval=30,
          eval_iters=1, sample_tokens=0)
    return out


@pytest.fixture(scope="module")
def engine(run_dir):
    return load(run_dir, device="cpu")


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine, model_id="chat", api_key=KEY, max_tokens_limit=64)) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def expected_reply(engine, messages, max_tokens, **settings) -> tuple[str, str]:
    """What the chat endpoint should answer: the engine's continuation of the rendered prompt, cut
    before the template's first stop string."""
    prompt = DEFAULT.render([(m["role"], m["content"]) for m in messages])
    events = list(engine.stream(prompt, max_new_tokens=max_tokens, **settings))
    text = "".join(e.text for e in events)
    cuts = [i for i in (text.find(s) for s in DEFAULT.stop) if i >= 0]
    if cuts:
        return text[: min(cuts)], "stop"
    return text, events[-1].finish_reason


def reference_logprobs(engine, ids: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = engine.model(torch.tensor([ids]))
    return torch.log_softmax(logits[0, -1].double() / (temperature or 1.0), dim=-1)


# ---- chat -----------------------------------------------------------------------------------------


def test_chat_reply_is_the_models_continuation_of_the_template(client, engine):
    r = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=40,
                                       temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    text, finish = expected_reply(engine, MESSAGES, 40, temperature=0)
    assert choice.message.role == "assistant"
    assert (choice.message.content, choice.finish_reason) == (text, finish)
    prompt = "System: be kind\nUser: hello 3\nAssistant:"
    assert r.usage.prompt_tokens == len(engine.encode_prompt(prompt))
    assert "\nUser:" not in choice.message.content


def test_chat_streaming_matches_the_plain_reply(client):
    kw = dict(model="chat", messages=MESSAGES, max_completion_tokens=30, seed=4)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == plain.choices[0].message.content and finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_chat_n_seed_and_stop_are_the_completion_of_the_rendered_prompt(client):
    prompt = DEFAULT.render([("user", "hello 1")])
    chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": [
        {"type": "text", "text": "hello "}, {"type": "text", "text": "1"}]}], n=3, seed=12,
        max_tokens=25, stop=["."], temperature=1.0, top_p=0.9)
    comp = client.completions.create(model="chat", prompt=prompt, n=3, seed=12, max_tokens=25,
                                     stop=[".", *DEFAULT.stop], temperature=1.0, top_p=0.9)
    assert [c.message.content for c in chat.choices] == [c.text for c in comp.choices]
    assert [c.finish_reason for c in chat.choices] == [c.finish_reason for c in comp.choices]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(chat.usage, c) for c in counts] == [getattr(comp.usage, c) for c in counts]


def test_chat_template_from_the_run_directory_and_from_a_file(run_dir, tmp_path, capsys):
    assert load_template(run_dir) == DEFAULT
    own = tmp_path / "run"
    own.mkdir()
    (own / "chat_template.json").write_text(json.dumps(
        {"user": "Q: {content}\n", "assistant": "A: {content}\n", "generation": "A:",
         "stop": "\nQ:"}))
    template = load_template(own)
    assert template.render([("system", "s"), ("user", "u")]) == "System: s\nQ: u\nA:"
    assert template.stop == ("\nQ:",)
    flag = tmp_path / "t.json"
    flag.write_text(json.dumps({"generation": "Bot:"}))
    assert load_template(own, flag) == ChatTemplate(generation="Bot:")
    flag.write_text(json.dumps({"user": "no placeholder"}))
    assert main(["serve", str(run_dir), "--chat-template", str(flag), "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"minigpt: error: {flag}: chat template 'user' must contain {{content}}"


def test_a_custom_template_is_what_the_model_sees(engine):
    template = ChatTemplate(user="User: {content}\n", generation="Assistant: hi", stop=("\n",))
    app = create_app(engine, model_id="chat", template=template)
    with serving(app) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello 2"}], "max_tokens": 20,
            "temperature": 0})
    text = engine.generate("User: hello 2\nAssistant: hi", max_new_tokens=20, temperature=0)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == text.split("\n")[0]


BAD_CHATS = [
    ("no messages", {"messages": "DROP"}, "messages"),
    ("messages null", {"messages": None}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("messages a string", {"messages": "hello"}, "messages"),
    ("message not an object", {"messages": ["hello"]}, "messages[0]"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("role a number", {"messages": [{"role": 1, "content": "x"}]}, "messages[0].role"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("content null", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("image part", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ("tool calls", {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]},
     "messages[0]"),
    ("unencodable", {"messages": [{"role": "user", "content": "snow \u2603"}]}, "messages"),
    ("both max tokens", {"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ("max_completion_tokens 0", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("logprobs a number", {"logprobs": 3}, "logprobs"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs 21", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("echo is not chat", {"echo": True}, "echo"),
    ("tools", {"tools": []}, "tools"),
]


@pytest.mark.parametrize("case,body,param", BAD_CHATS, ids=[c[0] for c in BAD_CHATS])
def test_malformed_chat_gets_a_400_naming_the_field(url, case, body, param):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {k: v for k, v in {"messages": MESSAGES, **body}.items() if v != "DROP"}
    r = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_the_openai_client_raises_bad_request_for_wrong_roles(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="chat", messages=[{"role": "wizard", "content": "x"}])
    assert "role" in str(exc.value)


# ---- logprobs -------------------------------------------------------------------------------------


def text_of(tokens: list[str]) -> str:
    """Tokens joined; a barely trained model may sample BOS, listed by its name but no text."""
    return "".join(t for t in tokens if t != BOS)


def test_completion_logprobs_are_the_sampling_distribution(client, engine):
    r = client.completions.create(model="chat", prompt="User: hello", max_tokens=12, logprobs=3,
                                  temperature=0.8, seed=5)
    choice = r.choices[0]
    lp = choice.logprobs
    assert text_of(lp.tokens) == choice.text
    # every token until the limit, or until the model ended the text (EOS is not listed)
    assert len(lp.tokens) == 12 if choice.finish_reason == "length" else 0 < len(lp.tokens) < 12
    tok = engine.tokenizer
    ids = engine.encode_prompt("User: hello")
    offset = 0
    for name, logprob, top, off in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                       lp.text_offset):
        ref = reference_logprobs(engine, ids, 0.8)
        token_id = tok.bos_id if name == BOS else tok.encode(name)[0]
        assert logprob == pytest.approx(float(ref[token_id]), abs=1e-4)
        assert off == offset
        values = list(top.values())
        assert len(top) == 3 and values == sorted(values, reverse=True)
        names = {BOS if t == tok.bos_id else tok.decode([t]) for t in torch.topk(ref, 3).indices}
        assert set(top) == names
        if logprob >= values[-1]:
            assert top[name] == pytest.approx(logprob)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        ids.append(token_id)
        offset += len(name) if name != BOS else 0


def test_streamed_logprobs_equal_the_plain_ones_and_stop_cuts_them(client):
    kw = dict(model="chat", prompt="User: hello", max_tokens=30, logprobs=2, seed=8, stop=["t"])
    plain = client.completions.create(**kw).choices[0]
    assert text_of(plain.logprobs.tokens) == plain.text  # no token of the stop string is listed
    tokens, values = [], []
    for chunk in client.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
    assert tokens == plain.logprobs.tokens and values == plain.logprobs.token_logprobs


def test_echo_with_logprobs_scores_the_prompt(client, engine):
    prompt = "User: hello 4"
    r = client.completions.create(model="chat", prompt=prompt, max_tokens=3, logprobs=1,
                                  echo=True, temperature=0)
    lp = r.choices[0].logprobs
    n = len(prompt)
    assert text_of(lp.tokens) == r.choices[0].text and r.choices[0].text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[: n + 3] == list(range(n + 3))
    ids = engine.encode_prompt(prompt)
    for i in range(1, n):
        ref = reference_logprobs(engine, ids[:i], 1.0)
        assert lp.token_logprobs[i] == pytest.approx(float(ref[ids[i]]), abs=1e-4)


def test_chat_logprobs_with_top_alternatives(client, engine):
    r = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=15, seed=2,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert text_of([t.token for t in content]) == r.choices[0].message.content
    for t in content:
        assert t.bytes == (list(t.token.encode()) if t.token != BOS else []) and t.logprob <= 0
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    streamed = []
    for chunk in client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=15,
                                                seed=2, logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += [(t.token, t.logprob) for t in chunk.choices[0].logprobs.content]
    assert streamed == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=5)
    assert plain.choices[0].logprobs is None


# ---- fuzz: random JSON never makes a 5xx -----------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False, width=32)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                       children, max_size=3),
    max_leaves=6,
)
COMPLETION_KEYS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
                   "seed", "stream", "stream_options", "echo", "logprobs", "best_of", "user", "model"]
CHAT_KEYS = ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "min_p", "n",
             "stop", "seed", "stream", "stream_options", "logprobs", "top_logprobs", "model"]
MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]) | JSON,
    "content": st.text(alphabet="abc the", max_size=10) | JSON, "name": JSON})
FIELD_VALUES = {"messages": st.lists(MESSAGE | JSON, max_size=3) | JSON,
                "prompt": st.text(alphabet="the cat", max_size=10) | JSON}


VALID_MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant"]),
    "content": st.text(alphabet="abc the", max_size=10)}), min_size=1, max_size=3)


def bodies(keys, required):
    """Mostly a valid request with a few fields of random type and value; sometimes any JSON."""
    anything = FIELD_VALUES.get(required, JSON)
    near_valid = st.fixed_dictionaries(
        {required: VALID_MESSAGES if required == "messages" else st.text(alphabet="the ")},
        optional={k: FIELD_VALUES.get(k, JSON) for k in keys if k != required})
    random_fields = st.lists(st.tuples(st.sampled_from(keys) | st.text(max_size=5), anything),
                             max_size=5).map(dict)
    return near_valid | random_fields | JSON


@pytest.fixture(scope="module")
def fuzz_url(engine):
    with serving(create_app(engine, model_id="chat", max_tokens_limit=4)) as base:
        yield base


FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, r.request.content + b" -> " + r.content
    if r.status_code != 200:
        error = r.json()["error"]
        assert 400 <= r.status_code < 500 and isinstance(error["message"], str)
        assert {"type", "param", "code"} <= set(error)


@pytest.mark.parametrize("path,keys,required", [("completions", COMPLETION_KEYS, "prompt"),
                                                ("chat/completions", CHAT_KEYS, "messages")])
def test_random_json_never_gets_a_5xx(fuzz_url, path, keys, required):
    statuses = []
    with httpx.Client(base_url=f"{fuzz_url}/v1", timeout=60) as http:

        @FUZZ
        @given(body=bodies(keys, required))
        def run(body):
            r = http.post(f"/{path}", content=json.dumps(body))
            check_answer(r)
            statuses.append(r.status_code)

        run()
        # the examples reach generation too, not only the first check of the parser
        assert 200 in statuses and len(set(statuses) - {200}) >= 1, statuses
        alive = http.post("/completions", json={"prompt": "the ", "max_tokens": 2})
        assert alive.status_code == 200


# ---- the playground: coloured tokens, their alternatives, the chat tab ------------------------------


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium")
def test_playground_colours_tokens_shows_alternatives_and_chats(url, client, engine):
    from playwright.sync_api import expect, sync_playwright

    greedy = client.completions.create(model="chat", prompt="User: hello", max_tokens=20,
                                       temperature=0, logprobs=5).choices[0]
    reply = client.chat.completions.create(model="chat", temperature=0, max_tokens=20, messages=[
        {"role": "user", "content": "hello 3"}]).choices[0].message.content
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#model")).to_contain_text("chat")
            page.fill("#api-key", KEY)
            page.fill("#prompt", "User: hello")
            page.fill("#max-tokens", "20")
            page.focus("#temperature")
            page.keyboard.press("Home")  # greedy: the same text as `greedy`
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("done", timeout=30_000)
            expect(page.locator("#completion")).to_have_text(greedy.text)
            tokens = page.locator("#completion .tok")
            names = [n for n in greedy.logprobs.tokens if n != BOS]
            expect(tokens).to_have_count(len(names))
            shown_p = [float(x) for x in tokens.evaluate_all("s => s.map(t => t.dataset.p)")]
            colours = tokens.evaluate_all("s => s.map(t => getComputedStyle(t).backgroundColor)")
            lps = [v for n, v in zip(greedy.logprobs.tokens, greedy.logprobs.token_logprobs)
                   if n != BOS]
            assert shown_p == pytest.approx([math.exp(v) for v in lps], abs=1e-4)
            assert all(c.startswith("rgb") and c != "rgba(0, 0, 0, 0)" for c in colours)
            assert len(set(colours)) > 1  # different probabilities, different colours

            tokens.nth(2).hover()
            tip = page.locator("#tooltip")
            expect(tip).to_be_visible()
            expect(tip.locator(".alt")).to_have_count(5)
            expect(tip.locator(".alt.chosen")).to_have_count(1)  # greedy: the top alternative
            expect(tip.locator(".head")).to_contain_text("%")

            page.click("#tab-chat")
            expect(page.locator("#prompt")).to_be_hidden()
            page.fill("#chat-input", "hello 3")
            page.press("#chat-input", "Enter")
            answer = page.locator(".msg.assistant[data-done=true] .content")
            expect(answer).to_have_text(reply, timeout=30_000)
            expect(page.locator(".msg.user .content")).to_have_text("hello 3")
            if reply:
                assert page.locator(".msg.assistant .tok").count() > 0
        finally:
            browser.close()
