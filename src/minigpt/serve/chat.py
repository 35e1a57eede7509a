"""Chat messages over HTTP: a /v1/chat/completions `messages` value checked by the one parser
(minigpt.chat_template, shared with `train --chat`), its mistakes turned into OpenAI-style 400s.
The template that renders the messages is minigpt.chat_template's, loaded from the run."""

from __future__ import annotations

from typing import Any

from .. import chat_template
from .openai_api import APIError


def parse_messages(messages: Any) -> list[tuple[str, str]]:
    """OpenAI `messages` -> (role, content) pairs; anything malformed is a 400 naming the message."""
    try:
        return chat_template.parse_messages(messages)
    except chat_template.MessageError as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None
