"""The OpenAI Completions wire format: parse and check a request body, shape responses and errors.

Checking is strict and explicit (no silent coercion): a wrong type, an out-of-range value or an
unknown field is an `APIError` carrying the HTTP status and an OpenAI-style error body, so existing
clients show the message just as they would for api.openai.com.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..batching import Prompt
from ..chat_template import json_type as _json_type  # one wording for every type error
from ..sampling import SamplingParams
from ..structured import Constraint

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 32  # n x number of prompts in one request
MAX_LOGPROBS = 20  # OpenAI's chat limit for top_logprobs (its legacy completions stop at 5)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class CompletionRequest:
    """What a client asked for, as checked: built once by the parser, never written to after, so
    no server setting or default lands in it later (the server's own settings, such as the UTF-8
    mask, join only when `sampling` builds the engine's settings)."""

    prompts: tuple[Prompt, ...]  # text, or token ids (a tuple of ints)
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = SamplingParams.temperature  # the project's default, not OpenAI's 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage counts
    echo: bool = False
    logprobs: int | None = None  # the k of `logprobs: k` (chat: top_logprobs); None = not asked
    # response_format / structured_outputs (`constraint_from`), and the field it came from
    constraint: Constraint | None = None
    constraint_param: str | None = None

    def sampling(self, utf8_mask: bool | None = None) -> SamplingParams:
        """The engine's settings for one prompt's `n` choices (each prompt starts afresh);
        `utf8_mask` is the server's setting (serve --no-utf8-mask), not the client's."""
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              seed=self.seed,
                              num_samples=self.n, logprobs=self.logprobs,
                              utf8_mask=utf8_mask, constraint=self.constraint).validate()


def parse_json(body: bytes) -> dict[str, Any]:
    """Request bytes -> JSON object. NaN/Infinity are not JSON and are refused, as is non-UTF-8."""

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {_json_type(data)}")
    return data


# Fields OpenAI defines that this server accepts only at their neutral value.
_NEUTRAL = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "suffix": (None,),
}


# what constrains the output (docs/structured.md): OpenAI's field and vLLM's
STRUCTURED_FIELDS = {"response_format", "structured_outputs"}
COMPLETION_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed",
    "stream", "stream_options", "echo", "user", "best_of", "logit_bias", "logprobs", *_NEUTRAL,
    *STRUCTURED_FIELDS,
}


def parse_completion_request(
    data: dict[str, Any], model_id: str, max_tokens_limit: int
) -> CompletionRequest:
    """Check every field of a /v1/completions body; raise APIError(4xx) on the first problem.

    The server's `max_tokens_limit` bounds max_tokens here, where it is checked, and caps the
    default a request that names none gets (OpenAI's 16)."""
    _check_known(data, COMPLETION_FIELDS)
    _check_model(data.get("model"), model_id)
    prompts = _prompts(data.get("prompt", ""))
    max_tokens = _int("max_tokens", data.get("max_tokens"),
                      min(DEFAULT_MAX_TOKENS, max_tokens_limit), 1, max_tokens_limit)
    sampling = _sampling(data, len(prompts))
    streaming = _streaming(data)
    logprobs = data.get("logprobs")
    if logprobs is not None:
        logprobs = _int("logprobs", logprobs, 0, 0, MAX_LOGPROBS)
    _check_unsupported(data)
    return CompletionRequest(prompts, max_tokens, **sampling, **streaming, logprobs=logprobs,
                             **constraint_from(data))


_VLLM_KINDS = ("regex", "json", "choice", "grammar", "json_object")


def constraint_from(data: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `response_format` or vLLM's `structured_outputs`, checked for shape ->
    CompletionRequest's constraint and constraint_param. What the pattern, schema or grammar
    says is checked later, off the event loop (`serve.app`), where it is compiled."""
    fmt, vllm = data.get("response_format"), data.get("structured_outputs")
    if fmt is not None and vllm is not None:
        raise APIError(400, "send response_format or structured_outputs, not both",
                       param="structured_outputs", code="invalid_value")
    if fmt is not None:
        return dict(constraint=_response_format(fmt), constraint_param="response_format")
    if vllm is not None:
        return dict(constraint=_structured_outputs(vllm), constraint_param="structured_outputs")
    return {}


def _response_format(fmt: Any) -> Constraint | None:
    _check_type("response_format", fmt, dict)
    kind = fmt.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise APIError(400, "response_format.type must be one of text, json_object, json_schema; "
                       f"got {kind!r}", param="response_format", code="invalid_value")
    _check_fields("response_format", fmt, allowed[kind])
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object()
    spec = fmt.get("json_schema")
    _check_type("response_format.json_schema", spec, dict)
    _check_fields("response_format.json_schema", spec, {"name", "schema", "strict", "description"})
    schema = spec.get("schema")
    _check_type("response_format.json_schema.schema", schema, dict)
    return Constraint.json_schema(schema)


def _structured_outputs(spec: Any) -> Constraint:
    _check_type("structured_outputs", spec, dict)
    _check_fields("structured_outputs", spec, set(_VLLM_KINDS))
    given = [k for k in _VLLM_KINDS if spec.get(k) not in (None, False)]
    if len(given) != 1:
        raise APIError(400, f"structured_outputs needs exactly one of {', '.join(_VLLM_KINDS)}; "
                       f"got {', '.join(given) or 'none'}", param="structured_outputs",
                       code="invalid_value")
    kind, value = given[0], spec[given[0]]
    name = f"structured_outputs.{kind}"
    if kind == "json_object":
        _check_type(name, value, bool)
        return Constraint.json_object()
    if kind == "json":  # vLLM takes the schema as an object or as its JSON text
        if not isinstance(value, str):
            _check_type(name, value, dict)
        return Constraint.json_schema(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(
                isinstance(v, str) and v for v in value):
            raise APIError(400, f"{name} must be a non-empty array of non-empty strings, got "
                           f"{_json_type(value)}", param=name, code="invalid_type")
        return Constraint.choice(value)
    _check_type(name, value, str)
    return Constraint.regex(value) if kind == "regex" else Constraint.grammar(value)


def _check_fields(name: str, obj: dict[str, Any], known: set[str]) -> None:
    extra = sorted(set(obj) - known)
    if extra:
        raise APIError(400, f"unknown {name} field(s): {', '.join(extra)}", param=name,
                       code="unknown_parameter")


def _check_known(data: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise APIError(
            400,
            f"Unrecognized request argument supplied: {', '.join(unknown)}",
            param=unknown[0],
            code="unknown_parameter",
        )


def _check_model(model: Any, model_id: str) -> None:
    if model is not None:
        _check_type("model", model, str)
        if model != model_id:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{model_id}'",
                param="model",
                code="model_not_found",
            )


def _sampling(data: dict[str, Any], prompts: int) -> dict[str, Any]:
    """temperature, top_p, top_k, min_p, n, best_of, stop and seed, checked (max_tokens is each
    endpoint's own: their defaults differ)."""
    temperature = _number(
        "temperature", data.get("temperature"), SamplingParams.temperature, 0.0, 2.0
    )
    top_p = _number("top_p", data.get("top_p"), 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise APIError(
            400, f"top_p must be > 0 and <= 1, got {top_p}", param="top_p", code="invalid_value"
        )
    top_k = _int("top_k", data.get("top_k"), 0, 0, None) or None
    min_p = _number("min_p", data.get("min_p"), 0.0, 0.0, 1.0) or None
    n = _int("n", data.get("n"), 1, 1, MAX_CHOICES)
    if n * prompts > MAX_CHOICES:
        raise APIError(
            400,
            f"n x number of prompts must be <= {MAX_CHOICES}, got {n} x {prompts}",
            param="n",
            code="invalid_value",
        )
    best_of = data.get("best_of")
    if best_of is not None and _int("best_of", best_of, 1, 1, None) != n:
        raise APIError(
            400,
            "best_of is not supported (it may only equal n)",
            param="best_of",
            code="unsupported_value",
        )
    stop = _stops(data.get("stop"))
    seed = data.get("seed")
    if seed is not None:
        seed = _int("seed", seed, 0, 0, 2**63 - 1)
    return dict(temperature=temperature, top_p=None if top_p == 1.0 else top_p, top_k=top_k,
                min_p=min_p, n=n, stop=stop, seed=seed)


def _streaming(data: dict[str, Any]) -> dict[str, bool]:
    """stream, echo and stream_options, checked."""
    stream = _bool("stream", data.get("stream"), False)
    echo = _bool("echo", data.get("echo"), False)
    options = data.get("stream_options")
    if options is None:
        return dict(stream=stream, echo=echo)
    _check_type("stream_options", options, dict)
    if not stream:
        raise APIError(
            400,
            "stream_options is only allowed when stream is true",
            param="stream_options",
            code="invalid_value",
        )
    extra = sorted(set(options) - {"include_usage"})
    if extra:
        raise APIError(
            400,
            f"unknown stream_options field(s): {', '.join(extra)}",
            param="stream_options",
            code="unknown_parameter",
        )
    include_usage = _bool("stream_options.include_usage", options.get("include_usage"), False)
    return dict(stream=stream, echo=echo, include_usage=include_usage)


def _check_unsupported(data: dict[str, Any]) -> None:
    """Fields accepted only at their neutral value (user is accepted and ignored)."""
    user = data.get("user")
    if user is not None:
        _check_type("user", user, str)
    logit_bias = data.get("logit_bias")
    if logit_bias not in (None, {}):
        raise APIError(
            400, "logit_bias is not supported", param="logit_bias", code="unsupported_value"
        )
    for name, allowed in _NEUTRAL.items():
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or value not in allowed):
            raise APIError(
                400,
                f"{name} is not supported by this server (only {allowed[0]!r})",
                param=name,
                code="unsupported_value",
            )


def _is_ids(value: Any) -> bool:
    """A non-empty list of token ids (JSON integers; true/false are not ids)."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def _prompts(prompt: Any) -> tuple[Prompt, ...]:
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids, or a list of
    such lists. Token ids are used as given (no BOS added); their range is checked against the
    model's vocabulary when they are encoded."""
    if isinstance(prompt, str):
        return (prompt,)
    if _is_ids(prompt):
        return (tuple(prompt),)
    if isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                or all(_is_ids(p) for p in prompt)):
        if len(prompt) > MAX_CHOICES:
            raise APIError(
                400,
                f"at most {MAX_CHOICES} prompts per request, got {len(prompt)}",
                param="prompt",
                code="invalid_value",
            )
        return tuple(p if isinstance(p, str) else tuple(p) for p in prompt)
    raise APIError(
        400,
        "prompt must be a string, a list of strings, a list of token ids or a list of non-empty "
        f"lists of token ids, got {_json_type(prompt)}",
        param="prompt",
        code="invalid_type",
    )


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(
            400,
            f"stop must be a string or a list of strings, got {_json_type(stop)}",
            param="stop",
            code="invalid_type",
        )
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(
            400,
            f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}",
            param="stop",
            code="invalid_value",
        )
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop", code="invalid_value")
    return tuple(stops)


def _check_type(name: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = {str: "a string", dict: "an object", bool: "a boolean"}
        raise APIError(
            400,
            f"{name} must be {names[kind]}, got {_json_type(value)}",
            param=name,
            code="invalid_type",
        )


def _bool(name: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    _check_type(name, value, bool)
    return value


def _int(name: str, value: Any, default: int, lo: int, hi: int | None) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(
            400,
            f"{name} must be an integer, got {_json_type(value)}",
            param=name,
            code="invalid_type",
        )
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise APIError(
            400, f"{name} must be {bound}, got {value}", param=name, code="invalid_value"
        )
    return value


def _number(name: str, value: Any, default: float, lo: float, hi: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(
            400,
            f"{name} must be a number, got {_json_type(value)}",
            param=name,
            code="invalid_type",
        )
    if not (lo <= value <= hi) or math.isnan(value):
        raise APIError(
            400,
            f"{name} must be between {lo:g} and {hi:g}, got {value}",
            param=name,
            code="invalid_value",
        )
    return float(value)


# ---- responses ----------------------------------------------------------------------------------


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_object(
    completion_id: str,
    created: int,
    model_id: str,
    choices: list[dict[str, Any]],
    usage_counts: dict[str, int] | None,
) -> dict[str, Any]:
    """A `text_completion` object: the whole response, or one streamed chunk (usage=None)."""
    obj: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model_id,
        "choices": choices,
    }
    if usage_counts is not None:
        obj["usage"] = usage_counts
    return obj


def choice(index: int, text: str, finish_reason: str | None,
           logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "minigpt"}


def now() -> int:
    return int(time.time())


def stream_error(message: str) -> str:
    """An error inside a stream whose 200 header is long gone: reported in-band, as OpenAI does."""
    return f"data: {json.dumps(error_body(f'generation failed: {message}', 'server_error'))}\n\n"

