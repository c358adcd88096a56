"""What the request models of every API share: open objects, message content, validation errors that name
their field, and the texts a model reads in one message or item."""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from rsafe_proxy.apis import channels
from rsafe_proxy.errors import InvalidRequest

# The most choices a request may ask for (OpenAI's limit), and so the most an answer may carry: each is judged on
# its own, so more would let one answer take the shared guard from everyone.
MAX_CHOICES = 128


class Open(BaseModel):
    """A request object: unknown fields are forwarded untouched; only what the proxy reads is checked."""

    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(Open):
    """One part of a multi-part message (text, image_url, input_audio, ...)."""

    type: str
    text: str | None = None


def _union_member(part: str | int) -> bool:
    """pydantic names the member of a union it tried (`str`, `list[ContentPart]`); the API's fields are snake_case."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper())


def invalid(error: pydantic.ValidationError) -> InvalidRequest:
    """The first validation error as an OpenAI-style error naming its field."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"] if not _union_member(part))
    message = "missing" if first["type"] == "missing" else str(first["msg"]).lower()
    if first["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    return InvalidRequest(f"Invalid type or value for '{param}': {message}.", param=param)


def message_text(content: str | list[ContentPart] | None) -> str:
    """The text of a message: its string, or its text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content if part.text)


def call_text(function: object) -> str:
    """A function or tool call as the guard reads it: `name(arguments)`."""
    found: dict[str, Any] = function if isinstance(function, dict) else {}
    return f"{found.get('name', '')}({found.get('arguments', '')})"


def turn_text(message: dict[str, Any]) -> str:
    """Everything a model reads in one message or input item: text and text parts, refusals, reasoning, tool
    calls as `name(arguments)`, tool outputs, whatever they look like (base64, a data: URL), and the text a
    payload carries (a file that is UTF-8 text); not metadata (ids, roles, types) nor binary payloads (images,
    audio, other files), which no guard reads (see channels.read and payloads)."""
    return "\n".join(channels.read(message, call=call_text, request=True).texts)
