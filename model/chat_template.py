"""Render a checkpoint's Jinja chat template with transformers' semantics.

Same environment as transformers' `render_jinja_template`: an immutable sandbox with
trim_blocks and lstrip_blocks, the loopcontrols extension, `raise_exception`, `strftime_now`,
a `tojson` filter that keeps non-ASCII text and takes indent/separators/sort_keys. The template
sees the messages rebuilt from plain JSON types (images become a placeholder string), plus the
tokenizer's special tokens (bos_token, ...) and any extra keyword such as `date_string`.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

KNOWN_ROLES = ("system", "user", "assistant", "tool", "ipython")


class ChatTemplateError(ValueError):
    """The conversation is malformed or the template refused it; the message says what to change."""


def load_chat_template(folder: str | Path) -> str | None:
    """The template of a checkpoint: chat_template.jinja, chat_template.json, then tokenizer_config.json."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            template = json.loads(path.read_text()).get("chat_template")
            if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
                template = {t["name"]: t["template"] for t in template}.get("default")
            if template:
                return template
    return None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ChatTemplateError(f"The chat template has a syntax error on line {error.lineno}: {error.message}. "
                                "Fix chat_template.json of the checkpoint.") from None


def plain_data(value: Any) -> Any:
    """JSON types only: the template checks which content parts exist, never reads image objects."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(key): plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    return f"<{type(value).__name__}>"


def validate_messages(messages: Any) -> None:
    """Raise ChatTemplateError naming the first malformed message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"Message {i} must be a dict with 'role' and 'content', got {message!r}.")
        if message["role"] not in KNOWN_ROLES:
            raise ChatTemplateError(f"Message {i} has the unknown role {message['role']!r}. Use one of "
                                    f"{', '.join(KNOWN_ROLES)}.")
        content = message.get("content")
        if isinstance(content, str) or message["role"] in ("tool", "ipython") or "tool_calls" in message:
            continue  # tool results and calls have their own formats in the template
        if not isinstance(content, (list, tuple)):
            raise ChatTemplateError(f"Message {i} content must be a string or a list of parts like "
                                    "{'type': 'text', 'text': ...} / {'type': 'image', ...}; got "
                                    f"{type(content).__name__}.")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"A text part of message {i} needs a 'text' string, got {part!r}.")
            if kind not in ("text", "image"):
                raise ChatTemplateError(f"Message {i} has a content part of type {kind!r}; this model takes "
                                        "'text' and 'image' parts.")


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False,
                         tools: list[dict] | None = None, documents: list[dict] | None = None,
                         **template_kwargs: Any) -> str:
    """The prompt string for one conversation (special tokens and e.g. date_string go in template_kwargs)."""
    validate_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(messages=plain_data(messages), tools=plain_data(tools),
                               documents=plain_data(documents), add_generation_prompt=add_generation_prompt,
                               **plain_data(template_kwargs))
    except jinja2.exceptions.TemplateError as error:
        raise ChatTemplateError(f"The chat template refused this conversation: {error}. Change the messages "
                                "accordingly (for example drop the system message or the images).") from None
