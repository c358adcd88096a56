"""Request and response bodies of the OpenAI API: validation with messages that name the field, and the
text the guard must see in them."""

from __future__ import annotations

import json
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from rsafe_proxy.errors import InvalidRequest

Kind = Literal["chat", "completion", "responses"]


class Open(BaseModel):
    """A request object: unknown fields are forwarded untouched; only what the proxy reads is checked."""

    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(Open):
    """One part of a multi-part message (text, image_url, input_audio, ...)."""

    type: str
    text: str | None = None


class Message(Open):
    """A chat message."""

    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(Open):
    """The fields of POST /v1/chat/completions that the proxy reads."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    n: int | None = Field(default=None, ge=1, le=128)


class CompletionRequest(Open):
    """The fields of POST /v1/completions that the proxy reads."""

    model: str
    prompt: str | list[str]
    stream: bool | None = False


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are unique: parsers disagree on which of two equal keys wins (the first, the last,
    an error), so a body with both could be judged in one reading and acted on in another."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise InvalidRequest(f"The request body repeats the key {key!r} in one object; send each key once.")
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    raise InvalidRequest(f"The request body holds {name}, which is not JSON.")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or InvalidRequest saying where it breaks.

    Only one reading is accepted: UTF-8 (no BOM, no other encoding guessed from the first bytes), unique keys,
    no NaN or Infinity, no lone surrogates. What the guard judges is then re-encoded (`encode_json`) and that is
    what the upstream receives, so the two cannot read different content out of the same bytes.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not UTF-8 encoded JSON.") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise InvalidRequest(
            f"The request body is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})."
        ) from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply to be read.") from None
    except ValueError as error:  # e.g. an integer past Python's digit limit
        raise InvalidRequest(f"The request body cannot be read: {error}.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def encode_json(body: dict[str, Any]) -> bytes:
    """The JSON bytes of a judged body, as forwarded upstream; a lone surrogate is refused (it has no UTF-8)."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("The request body holds an unpaired surrogate escape (\\ud800-\\udfff).") from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply to be read.") from None


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


def validate_chat(body: dict[str, Any]) -> ChatRequest:
    """Check the chat request's types; InvalidRequest names the first wrong field."""
    try:
        return ChatRequest.model_validate(body)
    except pydantic.ValidationError as error:
        raise invalid(error) from None


def validate_completion(body: dict[str, Any]) -> CompletionRequest:
    """Check the completion request's types; token-array prompts cannot be screened and are refused."""
    try:
        return CompletionRequest.model_validate(body)
    except pydantic.ValidationError as error:
        if isinstance(body.get("prompt"), list):
            raise InvalidRequest(
                "Invalid type for 'prompt': this proxy screens text, so 'prompt' must be a string or a list of strings "
                "(token arrays cannot be screened).",
                param="prompt",
            ) from None
        raise invalid(error) from None


def acts_upstream(body: dict[str, Any]) -> bool:
    """True when a chat or completion request asks the provider to act while answering (web search)."""
    return body.get("web_search_options") is not None


def message_text(content: str | list[ContentPart] | None) -> str:
    """The text of a message: its string, or its text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content if part.text)


# Roles whose text the input screen judges: what the caller wrote. Assistant turns are the model's own
# (screened when they were produced); tool results are data, not the caller's request.
SCREENED_ROLES = frozenset({"user", "system", "developer"})


def user_turns(kind: Kind, request: ChatRequest | CompletionRequest) -> list[str]:
    """The texts the input screen judges: every user, system and developer turn, or every prompt."""
    if isinstance(request, CompletionRequest):
        return [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
    return [
        text
        for message in request.messages
        if message.role in SCREENED_ROLES and (text := message_text(message.content))
    ]


def last_prompt(request: ChatRequest | CompletionRequest) -> str:
    """The user text an answer replies to (the output screen's `User:` line)."""
    if isinstance(request, CompletionRequest):
        return request.prompt if isinstance(request.prompt, str) else "\n\n".join(request.prompt)
    users = [message_text(message.content) for message in request.messages if message.role == "user"]
    return users[-1] if users else ""


# Every field of an answer that carries text to the client: reasoning models' traces included (vLLM sends
# `reasoning_content`, others `reasoning`), or unsafe text would pass in them unscreened.
_TEXT_FIELDS = ("reasoning_content", "reasoning", "content", "refusal")


def call_text(function: object) -> str:
    """A function or tool call as the guard reads it: `name(arguments)`."""
    found: dict[str, Any] = function if isinstance(function, dict) else {}
    return f"{found.get('name', '')}({found.get('arguments', '')})"


def choice_text(kind: Kind, choice: dict[str, Any]) -> str:
    """The text of one choice of a non-streamed answer, tool-call arguments included."""
    if kind == "completion":
        return str(choice.get("text") or "")
    message = choice.get("message") or {}
    parts = [message.get(name) or "" for name in _TEXT_FIELDS]
    for call in message.get("tool_calls") or []:
        parts.append(call_text(call.get("function") if isinstance(call, dict) else None))
    legacy = message.get("function_call")  # the deprecated `functions` API still answers this way
    if isinstance(legacy, dict):
        parts.append(call_text(legacy))
    return "\n".join(str(part) for part in parts if part)


def delta_text(kind: Kind, choice: dict[str, Any]) -> str:
    """The text added by one choice of a streamed chunk, tool-call arguments included."""
    if kind == "completion":
        return str(choice.get("text") or "")
    delta = choice.get("delta") or {}
    parts = [delta.get(name) or "" for name in _TEXT_FIELDS]
    for call in delta.get("tool_calls") or []:
        function = (call.get("function") or {}) if isinstance(call, dict) else {}
        parts.append(str(function.get("name") or "") + str(function.get("arguments") or ""))
    legacy = delta.get("function_call")
    if isinstance(legacy, dict):
        parts.append(str(legacy.get("name") or "") + str(legacy.get("arguments") or ""))
    return "".join(str(part) for part in parts if part)


def replace_choice(kind: Kind, choice: dict[str, Any], message: str) -> dict[str, Any]:
    """The choice with its content replaced by the policy's message and finish_reason content_filter."""
    if kind == "completion":
        return {**choice, "text": message, "finish_reason": "content_filter"}
    old = choice.get("message") or {}
    new = {"role": old.get("role", "assistant"), "content": message}
    return {**choice, "message": new, "finish_reason": "content_filter"}


def final_chunk(kind: Kind, template: dict[str, Any], index: int, message: str) -> dict[str, Any]:
    """A streamed chunk that carries the policy's message and ends the choice with content_filter."""
    base: dict[str, Any] = {key: template[key] for key in ("id", "object", "created", "model") if key in template}
    if kind == "completion":
        choice: dict[str, Any] = {"index": index, "text": message, "finish_reason": "content_filter"}
        return {**base, "object": base.get("object", "text_completion"), "choices": [choice]}
    choice = {"index": index, "delta": {"content": message}, "finish_reason": "content_filter"}
    return {**base, "object": "chat.completion.chunk", "choices": [choice]}
