"""Tokenizing over HTTP in vLLM's shapes: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`.

Clients that count tokens themselves use these instead of a local copy of the tokenizer:
lm-evaluation-harness's `local-completions` looks for `/tokenizer_info` and `/tokenize` and, when
they answer, tokenizes remotely and sends token-id prompts. Shapes (vLLM's):

    POST /tokenize    {"prompt": "text", "add_special_tokens": true, "return_token_strs": false}
                      or {"messages": [...], "add_generation_prompt": true}
                   -> {"count": N, "max_model_len": block_size, "tokens": [...], "token_strs": null}
    POST /detokenize  {"tokens": [...]} -> {"prompt": "text"}
    GET  /tokenizer_info -> {"tokenizer_class", "bos_token", "eos_token", "pad_token",
                             "model_max_length", "chat_template" (Jinja, the server's template)}

As in vLLM (whose Hugging Face tokenizers read special tokens in text), the special tokens' names
in a /tokenize text (`<|bos|>`, `<|eos|>`) are those tokens: lm-evaluation-harness finds the EOS
id by tokenizing the name /tokenizer_info gives. `add_special_tokens` adds the BOS that
/v1/completions adds to the same text. Text prompts of /v1/completions keep reading a special
token's name as plain text.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request

from ..chat_template import ChatTemplate
from ..engine import Engine
from ..errors import TokenizerError
from ..tokenization.base import BOS, EOS
from . import openai_api as oa
from .chat import parse_messages
from .logprobs import name
from .openai_api import APIError

TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                   "return_token_strs"}


def special_names(engine: Engine) -> dict[str, int]:
    """The special tokens' names (a BPE tokenizer records its own, e.g. GPT-2's <|endoftext|>)."""
    tok = engine.tokenizer
    return {getattr(tok, "bos_token", BOS): tok.bos_id, getattr(tok, "eos_token", EOS): tok.eos_id}


def encode_text(engine: Engine, text: str, add_special_tokens: bool) -> list[int]:
    """Text -> ids with special tokens' names read as those tokens; with add_special_tokens, the
    BOS that /v1/completions puts before the same text."""
    specials = special_names(engine)
    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    ids: list[int] = []
    for i, piece in enumerate(re.split(pattern, text)):
        if i % 2:
            ids.append(specials[piece])
        elif piece:
            ids += engine.tokenizer.encode(piece)
    if add_special_tokens and (not ids or engine.bos_prompts) and ids[:1] != [engine.tokenizer.bos_id]:
        ids.insert(0, engine.tokenizer.bos_id)
    return ids


def parse_tokenize_request(data: dict[str, Any], engine: Engine, model_id: str,
                           template: ChatTemplate) -> tuple[str, bool, bool]:
    """-> (text, add_special_tokens, return_token_strs), or an APIError naming the field."""
    oa._check_known(data, TOKENIZE_FIELDS)
    oa._check_model(data.get("model"), model_id)
    strs = oa._bool("return_token_strs", data.get("return_token_strs"), False)
    if ("prompt" in data) == ("messages" in data):
        raise APIError(400, "send one of 'prompt' (text) or 'messages' (a chat)", param="prompt",
                       code="invalid_value")
    if "messages" in data:
        messages = parse_messages(data["messages"])
        generation = oa._bool("add_generation_prompt", data.get("add_generation_prompt"), True)
        text = template.render(messages)
        if not generation:
            text = text.removesuffix(template.generation)
        return text, oa._bool("add_special_tokens", data.get("add_special_tokens"), False), strs
    if not isinstance(data["prompt"], str):
        raise APIError(400, f"prompt must be a string, got {oa._json_type(data['prompt'])}",
                       param="prompt", code="invalid_type")
    return data["prompt"], oa._bool("add_special_tokens", data.get("add_special_tokens"), True), strs


def parse_detokenize_request(data: dict[str, Any], engine: Engine, model_id: str) -> list[int]:
    oa._check_known(data, {"model", "tokens"})
    oa._check_model(data.get("model"), model_id)
    tokens = data.get("tokens")
    vocab = engine.tokenizer.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in tokens):
        raise APIError(400, f"tokens must be a list of token ids, got {oa._json_type(tokens)}",
                       param="tokens", code="invalid_type")
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of range: this model's vocabulary is "
                       f"0..{vocab - 1}", param="tokens", code="invalid_value")
    return tokens


def register_tokenize(app: FastAPI, engine: Engine, model_id: str, template: ChatTemplate,
                      auth: Callable[[Request], None],
                      read_body: Callable[[Request], Awaitable[bytes]]) -> None:
    """Add the three routes to `app`, behind the server's API key, as vLLM serves them (at the
    root, not under /v1)."""
    router = APIRouter(dependencies=[Depends(auth)])
    tok = engine.tokenizer
    names = {v: k for k, v in special_names(engine).items()}

    @router.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        data = oa.parse_json(await read_body(request))
        text, special, strs = parse_tokenize_request(data, engine, model_id, template)
        try:  # proportional to the text: off the event loop
            ids = await asyncio.to_thread(encode_text, engine, text, special)
        except TokenizerError as e:
            raise APIError(400, f"prompt cannot be encoded by this model's tokenizer: {e}",
                           param="prompt", code="invalid_prompt") from None
        return {"count": len(ids), "max_model_len": engine.block_size, "tokens": ids,
                "token_strs": [names.get(t) or name(tok, t)[0] for t in ids] if strs else None}

    @router.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        ids = parse_detokenize_request(oa.parse_json(await read_body(request)), engine, model_id)
        return {"prompt": tok.decode(ids)}

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        bos, eos = names[tok.bos_id], names[tok.eos_id]
        return {"tokenizer_class": f"minigpt-{tok.kind}", "bos_token": bos, "eos_token": eos,
                "pad_token": eos, "model_max_length": engine.block_size,
                "vocab_size": tok.vocab_size, "chat_template": template.to_jinja()}

    app.include_router(router)
