"""Chat for base models: a plain-text template that turns OpenAI `messages` into one prompt.

minigpt models are base models trained on plain text, with no special chat tokens, so a
conversation is written the way a script would write it, and the reply ends where the model starts
the next speaker's line (a stop string). The default template:

    System: You are terse.
    User: Hello
    Assistant: Hi.
    User: And now?
    Assistant:

that is, each message is `"<Role>: <content>\\n"`, then `"Assistant:"` for the model to continue,
and the reply stops at `"\\nUser:"` or `"\\nSystem:"` (stop strings are never part of the reply).
A model learns to chat in this format only when its corpus holds text in it; otherwise it just
continues the script.

Another template comes from a JSON file, `chat_template.json` in the run directory or
`minigpt serve --chat-template FILE`, with the same keys as `DEFAULT` below; `{content}` in a role's
line stands for the message text:

    {"system": "{content}\\n\\n", "user": "Q: {content}\\n", "assistant": "A: {content}\\n",
     "generation": "A:", "stop": ["\\nQ:"]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import rundir
from ..errors import ConfigError
from .openai_api import APIError, _json_type

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message
MAX_TEMPLATE_STOPS = 4


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "System: {content}\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    generation: str = "Assistant:"  # the prompt ends with this; the model writes the reply after it
    stop: tuple[str, ...] = ("\nUser:", "\nSystem:")

    def render(self, messages: list[tuple[str, str]]) -> str:
        """(role, content) pairs -> the prompt text the model continues."""
        lines = [getattr(self, role).replace("{content}", content) for role, content in messages]
        return "".join(lines) + self.generation

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ChatTemplate:
        """A template from parsed JSON; every mistake is a ConfigError naming `where`."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: a chat template must be a JSON object")
        unknown = sorted(set(d) - {*ROLES, "generation", "stop"})
        if unknown:
            raise ConfigError(f"{where}: unknown chat template key(s): {', '.join(unknown)}")
        values = {**DEFAULT.__dict__, **d}
        for key in (*ROLES, "generation"):
            if not isinstance(values[key], str):
                raise ConfigError(f"{where}: chat template '{key}' must be a string")
        for role in ROLES:
            if "{content}" not in values[role]:
                raise ConfigError(f"{where}: chat template '{role}' must contain {{content}}")
        stop = values["stop"]
        if isinstance(stop, str):
            stop = [stop]
        if (not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop)
                or len(stop) > MAX_TEMPLATE_STOPS):
            raise ConfigError(f"{where}: chat template 'stop' must be a list of up to "
                              f"{MAX_TEMPLATE_STOPS} non-empty strings")
        values["stop"] = tuple(stop)
        return cls(**values)


DEFAULT = ChatTemplate()


def load_template(run_dir: str | Path | None = None, path: str | Path | None = None) -> ChatTemplate:
    """`path` (serve --chat-template) if given, else the run's chat_template.json, else DEFAULT."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read chat template {path}: {e.strerror or e}") from None
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"chat template {path} is not valid JSON: {e}") from None
        return ChatTemplate.from_dict(d, str(path))
    d = rundir.read_chat_template(Path(run_dir)) if run_dir is not None else None
    if d is None:
        return DEFAULT
    return ChatTemplate.from_dict(d, str(Path(run_dir) / rundir.CHAT_TEMPLATE))


def parse_messages(messages: Any) -> list[tuple[str, str]]:
    """OpenAI `messages` -> (role, content) pairs; anything malformed is a 400 naming the message."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, f"messages must be a non-empty array, got {_json_type(messages)}",
                       param="messages", code="invalid_type" if not isinstance(messages, list)
                       else "invalid_value")
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, m: Any) -> tuple[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise APIError(400, f"{where} must be an object, got {_json_type(m)}", param=where,
                       code="invalid_type")
    unknown = sorted(set(m) - {"role", "content", "name"})
    if unknown:
        raise APIError(400, f"{where}: unsupported field(s) {', '.join(unknown)}", param=where,
                       code="unknown_parameter")
    role = m.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise APIError(400, f"{where}.role must be one of system, developer, user, assistant; "
                       f"got {role!r}" if isinstance(role, str) else
                       f"{where}.role must be a string, got {_json_type(role)}",
                       param=f"{where}.role", code="invalid_value")
    name = m.get("name")
    if name is not None and not isinstance(name, str):
        raise APIError(400, f"{where}.name must be a string, got {_json_type(name)}",
                       param=f"{where}.name", code="invalid_type")
    return role, _content(where, m.get("content"))


def _content(where: str, content: Any) -> str:
    """A string, or a list of text parts ({"type": "text", "text": ...}) joined together."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            and set(p) <= {"type", "text"} for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where}.content must be a string or a non-empty list of text parts, "
                   f"got {_json_type(content)}", param=f"{where}.content", code="invalid_type")
