"""What a model reads in a request beside its conversation: the tool definitions and answer schema it is
offered, and the request's other fields (a server's own extensions included)."""

from __future__ import annotations

import json
from typing import Any

from rsafe_proxy.apis import channels
from rsafe_proxy.guard.conversation import FIELDS, TOOLS, Turn

# What a model reads of a tool or an answer schema is all of it (a chat template renders the whole tool:
# `tool | tojson`): its names and descriptions first, its schemas as JSON (their property descriptions are
# instructions too), then every other field as channels.read finds it. Never an MCP tool's headers,
# authorization or URL: credentials stay out of the guard's prompt and its reasoning.
_TOOL_TEXTS = ("name", "description", "server_label", "server_description", "definition")
_TOOL_SCHEMAS = ("parameters", "schema", "input_schema")
_TOOL_NESTED = ("function", "json_schema", "format", "tools")
_TOOL_CREDENTIALS = ("headers", "authorization", "server_url")
_TOOL_READ = frozenset((*_TOOL_TEXTS, *_TOOL_NESTED, *_TOOL_CREDENTIALS))


def _tool_texts(value: Any) -> list[str]:
    if isinstance(value, list):
        return [text for element in value for text in _tool_texts(element)]
    if not isinstance(value, dict):
        return list(channels.read(value, request=True).texts) if isinstance(value, str) else []
    found = [str(value[key]) for key in _TOOL_TEXTS if isinstance(value.get(key), str) and value[key]]
    schemas = {key for key in _TOOL_SCHEMAS if isinstance(value.get(key), dict)}
    found += [json.dumps(value[key], ensure_ascii=False) for key in _TOOL_SCHEMAS if key in schemas]
    skipped = _TOOL_READ | schemas | _REQUEST_METADATA  # a Responses `text` holds `verbosity` beside `format`
    rest = {key: element for key, element in value.items() if key not in skipped}
    found += channels.read(rest, request=True).texts
    return found + [text for key in _TOOL_NESTED for text in _tool_texts(value.get(key))]


_OFFERED = ("tools", "functions", "response_format", "text")


def offered_tools(body: dict[str, Any]) -> Turn | None:
    """The tool definitions and answer schema a chat or Responses request offers the model (`tools`,
    `functions`, `response_format`, `text.format`), as one turn judged on its own; None without any."""
    text = "\n".join(_tool_texts([body.get(key) for key in _OFFERED]))
    return Turn(TOOLS, text, -2) if text else None


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


def _field_texts(turn_keys: frozenset[str], body: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The strings of each request field, beside its turns (`turn_keys`) and tools, that the model may read."""
    skipped = turn_keys | _REQUEST_METADATA | channels.METADATA | frozenset(_OFFERED)
    read = {key: channels.read(value, request=True).texts for key, value in body.items() if key not in skipped}
    return {key: texts for key, texts in read.items() if texts}


def request_fields(turn_keys: frozenset[str], body: dict[str, Any]) -> Turn | None:
    """The text of the request's other fields (all but `turn_keys`, where its turns are read), as one turn judged
    with the conversation (first: the next request of a conversation extends it); None without any. The rule of
    channels.read: a field is judged unless known not to carry text the model reads, so a server's own
    extensions are judged too (vLLM renders a request's `chat_template`, its `chat_template_kwargs` and
    `documents` into the prompt; a completion's `suffix` is read; a Responses `prompt` template is filled with
    its `variables`)."""
    text = "\n".join(text for texts in _field_texts(turn_keys, body).values() for text in texts)
    return Turn(FIELDS, text, -3) if text else None


def without_fields(turn_keys: frozenset[str], body: dict[str, Any]) -> dict[str, Any]:
    """The body without the fields request_fields judged: what a rewrite sends when they were among the new
    turns it replaces."""
    judged = _field_texts(turn_keys, body)
    return {key: value for key, value in body.items() if key not in judged}


def offered(turn_keys: frozenset[str], body: dict[str, Any], turns: list[Turn]) -> list[Turn]:
    """`turns` after the request's other fields the model reads and the tool definitions and answer schema it
    offers the model, if any."""
    fields = request_fields(turn_keys, body)
    turns = turns if fields is None else [fields, *turns]
    tools = offered_tools(body)
    return turns if tools is None else [tools, *turns]


def rewrite_base(turn_keys: frozenset[str], body: dict[str, Any], judged: list[Turn]) -> dict[str, Any]:
    """A copy of the body a rewrite starts from: the request's other fields go when they are among the judged
    turns (they have no replaced form)."""
    return without_fields(turn_keys, body) if any(turn.role == FIELDS for turn in judged) else dict(body)
