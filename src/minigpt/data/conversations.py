"""Conversations for chat fine-tuning (`train --chat`, `prepare --chat`): JSON-lines records with
OpenAI's `messages` ({"role": "system" | "developer" | "user" | "assistant", "content": "..."}),
each rendered by the chat template (minigpt.chat_template, the one `serve` renders prompts with)
into (text, learnt) segments: learnt is what the model writes when served, the assistant's replies.

    {"messages": [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}]}

A bad record (no `messages` field, messages not a list, an unknown role, content not text, no
assistant message) stops with "FILE line N: ..." or, with --skip-bad-records, is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..chat_template import ChatTemplate, MessageError, parse_messages
from ..errors import DataError
from .formats import Records, json_objects, kind_of

MESSAGES = "messages"
Segments = list[tuple[str, bool]]  # (text, learnt); their concatenation is the conversation


def iter_conversations(files: Iterable[Path], template: ChatTemplate, records: Records,
                       on_read: Callable[[int], None] | None = None) -> Iterator[Segments]:
    """Every good conversation of the files, one at a time, as the template renders it."""
    template.check_trainable()
    for path in files:
        if kind_of(path) != "jsonl":
            raise DataError(f"{path}: --chat reads JSON lines of conversations (.jsonl, one "
                            '{"messages": [...]} object per line)')
        found = False
        for obj, where in json_objects(path, records, on_read):
            segments = _conversation(obj, where, template, records)
            if segments is not None:
                found = True
                yield segments
        if not found:
            raise DataError(f"{path} has no conversations" if records.skipped == 0 else
                            f"{path} has no good conversations ({records.skipped} skipped; "
                            f"first: {records.first_bad})")


def _conversation(obj: dict[str, Any], where: str, template: ChatTemplate,
                  records: Records) -> Segments | None:
    if MESSAGES not in obj:
        shown = ", ".join(list(obj)[:5]) or "none"
        records.bad(f"{where}: no field {MESSAGES!r} (fields: {shown}); a conversation is "
                    '{"messages": [{"role": ..., "content": ...}, ...]}')
        return None
    try:
        messages = parse_messages(obj[MESSAGES])
    except MessageError as e:
        records.bad(f"{where}: {e}")
        return None
    if not any(role == "assistant" for role, _ in messages):
        records.bad(f"{where}: no assistant message to learn from")
        return None
    try:
        "".join(content for _, content in messages).encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape a lone surrogate, which no UTF-8 text can hold
        records.bad(f"{where}: a message is not valid Unicode (a lone surrogate)")
        return None
    return template.segments(messages)
