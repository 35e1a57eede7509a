"""Chat for base models: OpenAI `messages` and the plain-text template that renders them, the one
definition that training (`train --chat`) and serving (/v1/chat/completions) share.

minigpt models have no special chat tokens, so a conversation is written the way a script would
write it, and the reply ends where the model starts the next speaker's line (a stop string). The
default template:

    System: You are terse.
    User: Hello
    Assistant: Hi.
    User: And now?
    Assistant:

that is, each message is `"<Role>: <content>\\n"`, then `"Assistant:"` for the model to continue,
and the reply stops at `"\\nUser:"` or `"\\nSystem:"` (stop strings are never part of the reply).
A model learns to chat in this format when it is trained on conversations (`train --chat`, which
stores the template in the run) or when its corpus holds text in it; otherwise it just continues
the script.

Another template comes from a JSON file (`train --chat-template FILE`, `serve --chat-template FILE`,
or `chat_template.json` in the run directory) with the same keys as `DEFAULT` below; `{content}`
in a role's line stands for the message text:

    {"system": "{content}\\n\\n", "user": "Q: {content}\\n", "assistant": "A: {content}\\n",
     "generation": "A:", "stop": ["\\nQ:"]}

A template is also written as Jinja (`ChatTemplate.to_jinja`) for the tools that render chat
templates themselves: /tokenizer_info, and the HF and GGUF exports.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import rundir
from .errors import ConfigError

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message
MAX_TEMPLATE_STOPS = 4


class MessageError(ValueError):
    """A malformed `messages` value: the server answers it with a 400, training names the line."""

    def __init__(self, message: str, param: str, code: str):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "System: {content}\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    generation: str = "Assistant:"  # the prompt ends with this; the model writes the reply after it
    stop: tuple[str, ...] = ("\nUser:", "\nSystem:")

    def render(self, messages: list[tuple[str, str]]) -> str:
        """(role, content) pairs -> the prompt text the model continues."""
        return "".join(getattr(self, role).replace("{content}", content)
                       for role, content in messages) + self.generation

    def segments(self, messages: list[tuple[str, str]]) -> list[tuple[str, bool]]:
        """A whole conversation as training text: (text, learnt) pieces whose concatenation is the
        messages as `render` writes them. Learnt is what the model writes when served: each
        assistant line after the `generation` prefix that `render` ends a prompt with."""
        self.check_trainable()
        out: list[tuple[str, bool]] = []
        for role, content in messages:
            line = getattr(self, role).replace("{content}", content)
            if role == "assistant":
                out += [(self.generation, False), (line[len(self.generation):], True)]
            else:
                out.append((line, False))
        return [(text, learnt) for text, learnt in out if text]

    def check_trainable(self) -> None:
        """Training needs the served prompt's end to be where a reply starts in the trained text."""
        if not self.assistant.startswith(self.generation):
            raise ConfigError(f"chat template: the assistant line {self.assistant!r} must begin "
                              f"with the generation prompt {self.generation!r} to train on "
                              "conversations (what is learnt must be what is served)")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "stop": list(self.stop)}

    def to_jinja(self) -> str:
        """This template as Jinja over `messages` and `add_generation_prompt`, the form Hugging
        Face tokenizers (tokenizer_config.json's `chat_template`), vLLM (/tokenizer_info) and
        llama.cpp (GGUF's tokenizer.chat_template, with --jinja) render: it renders what `render`
        does (without the generation prompt when add_generation_prompt is false).

        The template's text is written as string literals, not `{% raw %}` blocks: Jinja rewrites
        the newlines of template text ("\r\n" -> "\n") and transformers renders with
        trim_blocks/lstrip_blocks, which touch template text but never a literal's value. A content
        given as text parts is joined, and an unknown role raises, as `parse_messages` does."""

        def literal(text: str) -> str:
            # JSON's escapes are Python's, which Jinja's lexer decodes ("unicode-escape")
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

        content = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                   "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}")
        branches = []
        for role in ROLES:
            names = [role, *(alias for alias, r in ROLE_ALIASES.items() if r == role)]
            test = " or ".join(f"message['role'] == '{n}'" for n in names)
            line = content.join(literal(part) for part in getattr(self, role).split("{content}"))
            branches.append(f"{{% {'if' if not branches else 'elif'} {test} %}}{line}")
        unknown = ("{% else %}{{ raise_exception('unknown role ' + message['role'] + ': this "
                   f"template knows {', '.join([*ROLES, *ROLE_ALIASES])}') }}}}{{% endif %}}")
        return ("{% for message in messages %}" + "".join(branches) + unknown + "{% endfor %}"
                "{% if add_generation_prompt %}" + literal(self.generation) + "{% endif %}")

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
    """`path` (a --chat-template file) if given, else the run's chat_template.json, else DEFAULT
    (runs trained before templates were stored, and runs never trained on conversations)."""
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


def json_type(value: Any) -> str:
    """How an error message names a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array" if value else "an empty array"
    return "an object"


def parse_messages(messages: Any) -> list[tuple[str, str]]:
    """OpenAI `messages` -> (role, content) pairs; anything malformed is a MessageError naming the
    message."""
    if not isinstance(messages, list) or not messages:
        raise MessageError(f"messages must be a non-empty array, got {json_type(messages)}",
                           "messages", "invalid_type" if not isinstance(messages, list)
                           else "invalid_value")
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, m: Any) -> tuple[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise MessageError(f"{where} must be an object, got {json_type(m)}", where, "invalid_type")
    unknown = sorted(set(m) - {"role", "content", "name"})
    if unknown:
        raise MessageError(f"{where}: unsupported field(s) {', '.join(unknown)}", where,
                           "unknown_parameter")
    role = m.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise MessageError(f"{where}.role must be one of system, developer, user, assistant; "
                           f"got {role!r}" if isinstance(role, str) else
                           f"{where}.role must be a string, got {json_type(role)}",
                           f"{where}.role", "invalid_value")
    name = m.get("name")
    if name is not None and not isinstance(name, str):
        raise MessageError(f"{where}.name must be a string, got {json_type(name)}",
                           f"{where}.name", "invalid_type")
    return role, _content(where, m.get("content"))


def _content(where: str, content: Any) -> str:
    """A string, or a list of text parts ({"type": "text", "text": ...}) joined together."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            and set(p) <= {"type", "text"} for p in content):
        return "".join(p["text"] for p in content)
    raise MessageError(f"{where}.content must be a string or a non-empty list of text parts, "
                       f"got {json_type(content)}", f"{where}.content", "invalid_type")
