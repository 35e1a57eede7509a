"""The OpenAI Chat Completions wire format: parse a /v1/chat/completions body, shape its replies.

A chat request becomes a `CompletionRequest` for the prompt its messages render to (serve/chat.py),
with the template's stop strings added to the client's, so generation, stop strings, cancellation
and log-probabilities are the completions path's own; only the request fields and the response
objects (`chat.completion`, `chat.completion.chunk` with `delta`) differ.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..chat_template import ChatTemplate
from . import logprobs as lp
from . import openai_api as oa
from .chat import parse_messages
from .jobs import Job, JobFailed, merge_deltas, next_or_500
from .openai_api import APIError, CompletionRequest

DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's default is "up to the context"; a reply usually stops first

CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "n", "stop", "seed", "stream", "stream_options", "user", "logprobs", "top_logprobs",
    "logit_bias", "frequency_penalty", "presence_penalty", *oa.STRUCTURED_FIELDS,
}


@dataclass(frozen=True)
class ChatRequest:
    completion: CompletionRequest  # what the engine runs: the rendered prompt and the settings
    logprobs: bool = False


def parse_chat_request(data: dict[str, Any], model_id: str, max_tokens_limit: int,
                       template: ChatTemplate) -> ChatRequest:
    """Check every field of a /v1/chat/completions body; raise APIError(4xx) on the first problem."""
    oa._check_known(data, CHAT_FIELDS)
    oa._check_model(data.get("model"), model_id)
    prompt = template.render(parse_messages(data.get("messages")))
    max_tokens = _max_tokens(data, max_tokens_limit)
    sampling = oa._sampling(data, 1)
    streaming = oa._streaming({k: data[k] for k in ("stream", "stream_options") if k in data})
    stop = sampling.pop("stop")
    stop = (*stop, *(s for s in template.stop if s not in stop))
    logprobs = oa._bool("logprobs", data.get("logprobs"), False)
    top = data.get("top_logprobs")
    top_k_logprobs = None
    if top is not None:
        top_k_logprobs = oa._int("top_logprobs", top, 0, 0, oa.MAX_LOGPROBS)
        if not logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true",
                           param="top_logprobs", code="invalid_value")
    elif logprobs:
        top_k_logprobs = 0
    oa._check_unsupported({k: v for k, v in data.items() if k != "logprobs"})
    req = CompletionRequest((prompt,), max_tokens, **sampling, stop=stop, **streaming,
                            logprobs=top_k_logprobs, **oa.constraint_from(data))
    return ChatRequest(req, logprobs)


def _max_tokens(data: dict[str, Any], limit: int) -> int:
    """max_completion_tokens (OpenAI's current name) or max_tokens (the older one); both only if
    they agree."""
    default = min(DEFAULT_CHAT_MAX_TOKENS, limit)
    new = oa._int("max_completion_tokens", data.get("max_completion_tokens"), default, 1, limit)
    old = oa._int("max_tokens", data.get("max_tokens"), default, 1, limit)
    both = data.get("max_completion_tokens") is not None and data.get("max_tokens") is not None
    if both and new != old:
        raise APIError(400, "max_tokens and max_completion_tokens differ; send one of them",
                       param="max_completion_tokens", code="invalid_value")
    return new if data.get("max_completion_tokens") is not None else old


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatReply:
    """Turns a job's deltas into a `chat.completion` object or a stream of chunks."""

    def __init__(self, chat: ChatRequest, model_id: str, prompt_tokens: int):
        self.chat, self.req = chat, chat.completion
        self.id, self.created, self.model_id = new_chat_id(), oa.now(), model_id
        self.prompt_tokens = prompt_tokens
        self.choices = self.req.n

    def _object(self, kind: str, choices: list[dict[str, Any]],
                usage: dict[str, int] | None = None) -> dict[str, Any]:
        obj = {"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
               "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    def _logprobs(self, scores: list[lp.Scored]) -> dict[str, Any] | None:
        return lp.chat_logprobs(scores) if self.chat.logprobs else None

    async def collect(self, job: Job) -> dict[str, Any]:
        texts = [""] * self.choices
        scores: list[list[lp.Scored]] = [[] for _ in range(self.choices)]
        finish: list[str | None] = [None] * self.choices
        tokens = 0
        while (batch := await next_or_500(job)) is not None:
            for d in batch:
                texts[d.index] += d.text
                scores[d.index] += d.scores
                if d.finish_reason:
                    finish[d.index], tokens = d.finish_reason, tokens + d.tokens
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i],
                                            "refusal": None},
                    "logprobs": self._logprobs(scores[i]), "finish_reason": finish[i]}
                   for i in range(self.choices)]
        return self._object("chat.completion", choices, oa.usage(self.prompt_tokens, tokens))

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        obj = self._object("chat.completion.chunk", choices, usage)
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    @staticmethod
    def _delta(i: int, delta: dict[str, Any], finish: str | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    async def sse(self, job: Job) -> AsyncIterator[str]:
        # OpenAI's stream opens each choice with a delta carrying the role and no text yet
        for i in range(self.choices):
            yield self._chunk([self._delta(i, {"role": "assistant", "content": ""})])
        tokens = 0
        try:
            while (batch := await job.next_batch()) is not None:
                merged, done = merge_deltas(batch)
                tokens += done
                for i, (text, finish, scores) in merged.items():
                    delta = {"content": text} if text else {}
                    yield self._chunk([self._delta(i, delta, finish, self._logprobs(scores))])
        except JobFailed as e:
            yield oa.stream_error(e.args[0])
            return
        if self.req.include_usage:
            yield self._chunk([], oa.usage(self.prompt_tokens, tokens))
        yield "data: [DONE]\n\n"
