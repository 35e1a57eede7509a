"""/tokenize, /detokenize and /tokenizer_info in vLLM's shapes on a real uvicorn server: the ids are
the ones /v1/completions would decode from, the special tokens' names map to their ids (how
lm-evaluation-harness finds EOS), and the Jinja chat template renders what the server's template
renders."""

from __future__ import annotations

import httpx
import jinja2
import pytest
import torch

from minigpt.chat_template import DEFAULT, ChatTemplate
from minigpt.config import ModelConfig
from minigpt.engine import Engine
from minigpt.model import GPT
from minigpt.serve.app import create_app
from minigpt.tokenization import CharTokenizer
from test_server import serving

KEY = "sk-tok"


@pytest.fixture(scope="module")
def engine():
    tok = CharTokenizer.train(["System: be\nUser: hi\nAssistant: abcdefghij\n"])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                            n_embd=16))
    return Engine(model, tok)


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine, model_id="tiny", api_key=KEY)) as base:
        yield base


def post(url, path, body):
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"})


def test_tokenize_gives_the_ids_completions_decode_from(url, engine):
    r = post(url, "/tokenize", {"model": "tiny", "prompt": "abc hij", "return_token_strs": True})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == engine.encode_prompt("abc hij")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 32
    assert "".join(body["token_strs"]) == "abc hij"
    plain = post(url, "/tokenize", {"prompt": "abc", "add_special_tokens": False}).json()
    assert plain["tokens"] == engine.tokenizer.encode("abc") and plain["token_strs"] is None
    back = post(url, "/detokenize", {"model": "tiny", "tokens": body["tokens"]}).json()
    assert back == {"prompt": "abc hij"}


def test_special_token_names_are_their_tokens(url, engine):
    info = httpx.get(f"{url}/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    tok = engine.tokenizer
    eos = post(url, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    bos = post(url, "/tokenize", {"prompt": info["bos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == [tok.eos_id] and bos.json()["tokens"] == [tok.bos_id]
    mixed = post(url, "/tokenize", {"prompt": "ab" + info["eos_token"] + "c",
                                    "add_special_tokens": False}).json()["tokens"]
    assert mixed == [*tok.encode("ab"), tok.eos_id, *tok.encode("c")]
    assert info["model_max_length"] == 32 and info["vocab_size"] == tok.vocab_size


def test_messages_are_rendered_with_the_servers_template(url, engine):
    messages = [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}]
    r = post(url, "/tokenize", {"messages": messages}).json()
    assert r["tokens"] == engine.tokenizer.encode("System: be\nUser: hi\nAssistant:")
    r = post(url, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert r["tokens"] == engine.tokenizer.encode("System: be\nUser: hi\n")


@pytest.mark.parametrize("template", [DEFAULT, ChatTemplate(
    system="{content}\n\n", user="\n  Q: {content}\r\n", assistant="A: {content} {% x %}\n",
    generation="A:", stop=("\nQ:",)), ChatTemplate(user="« {content} » / {content}\n", generation="",
                                                   assistant="\"{content}\" {% endraw %}\n")],
    ids=["default", "custom", "quotes"])
def test_jinja_chat_template_renders_what_the_template_renders(template):
    """Jinja's own template text would lose "\r" and "{% endraw %}" ends a raw block: the template's
    text is written as string literals. transformers' environment (trim_blocks, lstrip_blocks) is
    tested by tests/test_export_hf.py."""
    messages = [("system", "be {{ terse }}"), ("user", "hi"), ("assistant", "yo"), ("user", "?")]
    jinja = jinja2.Environment().from_string(template.to_jinja())
    wire = [{"role": "developer" if r == "system" else r, "content": c} for r, c in messages]
    wire[1]["content"] = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    assert jinja.render(messages=wire, add_generation_prompt=True) == template.render(messages)
    assert (jinja.render(messages=wire, add_generation_prompt=False)
            == template.render(messages).removesuffix(template.generation))
    with pytest.raises(jinja2.UndefinedError):  # an unknown role fails, as it does in minigpt
        jinja.render(messages=[{"role": "tool", "content": "x"}])


BAD = [
    ("neither prompt nor messages", "/tokenize", {"model": "tiny"}, "prompt"),
    ("both prompt and messages", "/tokenize", {"prompt": "a", "messages": []}, "prompt"),
    ("prompt not a string", "/tokenize", {"prompt": [1, 2]}, "prompt"),
    ("unencodable prompt", "/tokenize", {"prompt": "\u2603"}, "prompt"),
    ("unknown field", "/tokenize", {"prompt": "a", "truncate": 3}, "truncate"),
    ("tokens not a list", "/detokenize", {"tokens": "abc"}, "tokens"),
    ("token out of range", "/detokenize", {"tokens": [1, 999]}, "tokens"),
    ("wrong model", "/detokenize", {"model": "gpt-4", "tokens": [1]}, "model"),
]


@pytest.mark.parametrize("case,path,body,param", BAD, ids=[c[0] for c in BAD])
def test_bad_tokenize_requests_get_a_400_naming_the_field(url, case, path, body, param):
    r = post(url, path, body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


def test_the_routes_need_the_key(url):
    assert httpx.post(f"{url}/tokenize", json={"prompt": "a"}).status_code == 401
    assert httpx.get(f"{url}/tokenizer_info").status_code == 401
