"""Request and response bodies of the OpenAI API: validation with messages that name the field, and the
text the guard must see in them."""

from __future__ import annotations

import json
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from rsafe_proxy import channels
from rsafe_proxy.errors import InvalidRequest
from rsafe_proxy.guard.conversation import FIELDS, TOOLS, Turn

Kind = Literal["chat", "completion", "responses"]
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


class Message(Open):
    """A chat message."""

    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(Open):
    """The fields of POST /v1/chat/completions that the proxy reads."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)


class CompletionRequest(Open):
    """The fields of POST /v1/completions that the proxy reads."""

    model: str
    prompt: str | list[str]
    stream: bool | None = False
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)


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


def read_json(raw: bytes) -> dict[str, Any] | None:
    """An upstream answer or streamed event as parse_json reads a request, or None where it has no such reading:
    what the proxy judged is what any client parser reads out of the bytes it passes on."""
    try:
        return parse_json(raw)
    except InvalidRequest:
        return None


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


def turn_text(message: dict[str, Any]) -> str:
    """Everything a model reads in one message or input item: text and text parts, refusals, reasoning, tool
    calls as `name(arguments)`, tool outputs; not metadata (ids, roles, types) nor binary payloads (images,
    audio), which no guard reads (see channels.read)."""
    return "\n".join(channels.read(message, call=call_text).texts)


def request_turns(request: ChatRequest | CompletionRequest) -> list[Turn]:
    """The turns the input screen judges, in order: every message whatever its role (what the caller wrote,
    the tool and function results it passes on, the assistant turns it supplies, a prefill last), or every
    prompt of a completion. A policy may narrow the roles (`input_roles`)."""
    if isinstance(request, CompletionRequest):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        return [Turn("user", prompt, position) for position, prompt in enumerate(prompts) if prompt]
    turns = (
        Turn(message.role, turn_text(message.model_dump()), position)
        for position, message in enumerate(request.messages)
    )
    return [turn for turn in turns if turn.text]


# What a model reads of a tool or an answer schema: names and descriptions, and the schemas (their property
# descriptions are instructions too). Never an MCP tool's headers, authorization or URL: credentials stay out
# of the guard's prompt and its reasoning.
_TOOL_TEXTS = ("name", "description", "server_label", "server_description", "definition")
_TOOL_SCHEMAS = ("parameters", "schema", "input_schema")
_TOOL_NESTED = ("function", "json_schema", "format", "tools")


def _tool_texts(value: Any) -> list[str]:
    if isinstance(value, list):
        return [text for element in value for text in _tool_texts(element)]
    if not isinstance(value, dict):
        return []
    found = [str(value[key]) for key in _TOOL_TEXTS if isinstance(value.get(key), str) and value[key]]
    found += [json.dumps(value[key], ensure_ascii=False) for key in _TOOL_SCHEMAS if isinstance(value.get(key), dict)]
    return found + [text for key in _TOOL_NESTED for text in _tool_texts(value.get(key))]


_OFFERED = ("tools", "functions", "response_format", "text")


def offered_tools(body: dict[str, Any]) -> Turn | None:
    """The tool definitions and answer schema a chat or Responses request offers the model (`tools`,
    `functions`, `response_format`, `text.format`), as one turn judged on its own; None without any."""
    text = "\n".join(_tool_texts([body.get(key) for key in _OFFERED]))
    return Turn(TOOLS, text, -2) if text else None


# Where each kind keeps the text read as its turns (request_turns, responses_api.request_turns).
_TURN_KEYS: dict[Kind, frozenset[str]] = {
    "chat": frozenset({"messages"}),
    "completion": frozenset({"prompt"}),
    "responses": frozenset({"input", "instructions"}),
}
# Request fields whose strings the model does not read as text: who asks, how to sample and stop, what to
# return, which stored state to continue (ids), cache and routing hints. Beside channels.METADATA.
_REQUEST_METADATA = frozenset(
    {
        "user",
        "safety_identifier",
        "metadata",
        "stop",
        "tool_choice",
        "modalities",
        "audio",
        "stream_options",
        "logit_bias",
        "reasoning",
        "reasoning_effort",
        "verbosity",
        "include",
        "truncation",
        "previous_response_id",
        "conversation",
        "prompt_cache_key",
        "prompt_cache_retention",
        "cache_salt",
        "request_id",
    }
)


def _field_texts(kind: Kind, body: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The strings of each request field, beside its turns and tools, that the model may read."""
    skipped = _TURN_KEYS[kind] | _REQUEST_METADATA | channels.METADATA | frozenset(_OFFERED)
    read = {key: channels.read(value).texts for key, value in body.items() if key not in skipped}
    return {key: texts for key, texts in read.items() if texts}


def request_fields(kind: Kind, body: dict[str, Any]) -> Turn | None:
    """The text of the request's other fields, as one turn judged with the conversation (first: the next
    request of a conversation extends it); None without any. The rule of channels.read: a field is judged unless
    known not to carry text the model reads, so a server's own extensions are judged too (vLLM renders a
    request's `chat_template`, its `chat_template_kwargs` and `documents` into the prompt; a completion's
    `suffix` is read; a Responses `prompt` template is filled with its `variables`)."""
    text = "\n".join(text for texts in _field_texts(kind, body).values() for text in texts)
    return Turn(FIELDS, text, -3) if text else None


def without_fields(kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
    """The body without the fields request_fields judged: what a rewrite sends when they were among the new
    turns it replaces."""
    judged = _field_texts(kind, body)
    return {key: value for key, value in body.items() if key not in judged}


def rewritten_message(message: dict[str, Any], instruction: str) -> dict[str, Any]:
    """A chat message whose only text is `instruction`: its content replaced, its other text (refusal,
    reasoning, a participant name, audio) dropped, its tool calls kept with empty arguments so that the tool
    results answering them still match."""
    role = message.get("role")
    kept = ("role", "tool_call_id", "name") if role == "function" else ("role", "tool_call_id")
    new: dict[str, Any] = {key: message[key] for key in kept if key in message}
    new["content"] = instruction
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        new["tool_calls"] = [_emptied(call) for call in calls]
    if isinstance(message.get("function_call"), dict):
        new["function_call"] = {"name": message["function_call"].get("name", ""), "arguments": "{}"}
    return new


def _emptied(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    name = function.get("name", "") if isinstance(function, dict) else ""
    return {**{key: call[key] for key in ("id", "type") if key in call}, "function": {"name": name, "arguments": "{}"}}


def last_prompt(request: ChatRequest | CompletionRequest) -> str:
    """The user text an answer replies to (the output screen's `User:` line)."""
    if isinstance(request, CompletionRequest):
        return request.prompt if isinstance(request.prompt, str) else "\n\n".join(request.prompt)
    users = [message_text(message.content) for message in request.messages if message.role == "user"]
    return users[-1] if users else ""


def call_text(function: object) -> str:
    """A function or tool call as the guard reads it: `name(arguments)`."""
    found: dict[str, Any] = function if isinstance(function, dict) else {}
    return f"{found.get('name', '')}({found.get('arguments', '')})"


def read_choice(kind: Kind, choice: Any, streamed: bool = False) -> channels.Reading:
    """Every channel of one choice, the message or delta and the choice's own extras: content, refusal,
    reasoning (`reasoning_content`, `reasoning`), tool and function calls, audio transcripts, annotations, and
    any field a provider adds; audio data and other binary payloads are set apart (see channels.read)."""
    return channels.read(choice, call=None if streamed else call_text, streamed=streamed)


def read_extras(answer: dict[str, Any], streamed: bool = False) -> channels.Reading:
    """The text a provider adds to an answer or chunk beside its choices (its value has no `choices`, unless they
    are no list: then they are read as a provider's field)."""
    listed = isinstance(answer.get("choices"), list)
    rest = {key: value for key, value in answer.items() if key != "choices" or not listed}
    return channels.read(rest, call=None if streamed else call_text, streamed=streamed)


def without_extras(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer with only its metadata and choices: what remains when the choice its extras were judged
    with is replaced."""
    return {key: value for key, value in answer.items() if key == "choices" or key in channels.METADATA}


def choice_text(kind: Kind, choice: dict[str, Any]) -> str:
    """The text of one choice of a non-streamed answer, tool calls as `name(arguments)`."""
    return "\n".join(read_choice(kind, choice).texts)


def delta_text(kind: Kind, choice: dict[str, Any]) -> str:
    """The text added by one choice of a streamed chunk, tool-call names and arguments included."""
    return "".join(read_choice(kind, choice, streamed=True).texts)


def chunk_texts(kind: Kind, data: dict[str, Any]) -> tuple[list[tuple[int, str]], tuple[str, ...], dict[str, Any]]:
    """(choice index, text) for the text a streamed chunk adds (a provider's extras count for its first
    choice), where its binary payloads were, and the chunk without them (the same object when there were none)."""
    texts: list[tuple[int, str]] = []
    unjudged: list[str] = []
    choices: list[Any] = []
    renumbered = False
    listed = data.get("choices")
    for position, choice in enumerate(listed if isinstance(listed, list) else []):
        reading = read_choice(kind, choice, streamed=True)  # whatever it is: a string choice is text too
        index = choice_index(choice)
        texts.append((index, "".join(reading.texts)))
        unjudged += [f"choices.{position}.{path}" for path in reading.unjudged]
        value = reading.value
        if isinstance(value, dict) and type(value.get("index")) is not int:
            # 1.0, True, "1", none: a client groups it by its own reading, so it gets the one it was judged by
            value, renumbered = {**value, "index": index}, True
        choices.append(value)
    extras = read_extras(data, streamed=True)
    if extras.texts:
        texts.append((texts[0][0] if texts else 0, "".join(extras.texts)))
    unjudged += extras.unjudged
    if not unjudged and not renumbered:
        return texts, (), data
    rebuilt = {**extras.value, "choices": choices} if isinstance(listed, list) else extras.value
    return texts, tuple(unjudged), rebuilt


def choice_index(choice: Any) -> int:
    """The index of a choice (0 where it has none or a malformed one, or is no object)."""
    index = choice.get("index") if isinstance(choice, dict) else None
    return index if isinstance(index, int) and not isinstance(index, bool) else 0


def replace_choice(kind: Kind, choice: Any, message: str) -> dict[str, Any]:
    """A choice that carries only the policy's message and finish_reason content_filter: nothing of the answer
    it replaces survives (log probabilities, annotations, audio, tool calls, reasoning, a provider's extras)."""
    if kind == "completion":
        return {"index": choice_index(choice), "text": message, "finish_reason": "content_filter", "logprobs": None}
    new = {"role": "assistant", "content": message}
    return {"index": choice_index(choice), "message": new, "finish_reason": "content_filter", "logprobs": None}


def final_chunk(kind: Kind, template: dict[str, Any], index: int, message: str) -> dict[str, Any]:
    """A streamed chunk that carries the policy's message and ends the choice with content_filter."""
    base: dict[str, Any] = {key: template[key] for key in ("id", "object", "created", "model") if key in template}
    if kind == "completion":
        choice: dict[str, Any] = {"index": index, "text": message, "finish_reason": "content_filter"}
        return {**base, "object": base.get("object", "text_completion"), "choices": [choice]}
    choice = {"index": index, "delta": {"content": message}, "finish_reason": "content_filter"}
    return {**base, "object": "chat.completion.chunk", "choices": [choice]}
