"""The Responses API (POST /v1/responses): the request fields the proxy reads, the text the guard must see in a
request, an answer or a streamed event, and the answer or events that replace a stopped one."""

from __future__ import annotations

import uuid
from typing import Any

import pydantic

from rsafe_proxy.bodies import SCREENED_ROLES, ContentPart, Open, call_text, invalid, message_text

# Keys of output items and their parts that carry text to the client: message text and refusals, reasoning
# summaries and text, tool-call arguments and inputs, code. Annotations (citations) are not judged.
_TEXT_KEYS = ("text", "refusal", "arguments", "input", "code")
# The events that end a streamed response.
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class InputItem(Open):
    """One item of `input`: a message (`type` "message" or absent), a tool output, an earlier output item."""

    type: str | None = None
    role: str | None = None
    content: str | list[ContentPart] | None = None


class ResponsesRequest(Open):
    """The fields of POST /v1/responses that the proxy reads."""

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    stream: bool | None = False


def validate_responses(body: dict[str, Any]) -> ResponsesRequest:
    """Check the request's types; InvalidRequest names the first wrong field."""
    try:
        return ResponsesRequest.model_validate(body)
    except pydantic.ValidationError as error:
        raise invalid(error) from None


def _is_message(item: InputItem) -> bool:
    return item.type in (None, "message") and item.role is not None


def request_turns(request: ResponsesRequest) -> list[str]:
    """What the input screen judges: the instructions, and every user, system and developer message."""
    turns = [request.instructions] if request.instructions else []
    if isinstance(request.input, str):
        return [*turns, request.input] if request.input else turns
    messages = (item for item in request.input if _is_message(item) and item.role in SCREENED_ROLES)
    return turns + [text for item in messages if (text := message_text(item.content))]


def request_prompt(request: ResponsesRequest) -> str:
    """The user text the answer replies to (the output screen's `User:` line)."""
    if isinstance(request.input, str):
        return request.input
    users = [message_text(item.content) for item in request.input if _is_message(item) and item.role == "user"]
    return users[-1] if users else ""


def rewritten(body: dict[str, Any], request: ResponsesRequest, flagged: set[str], instruction: str) -> dict[str, Any]:
    """The request body with every flagged text (instructions, input, message) replaced by `instruction`."""
    new = dict(body)
    if request.instructions and request.instructions in flagged:
        new["instructions"] = instruction
    if isinstance(request.input, str):
        if request.input in flagged:
            new["input"] = instruction
        return new
    new["input"] = [
        {**raw, "content": instruction}
        if _is_message(item) and item.role in SCREENED_ROLES and message_text(item.content) in flagged
        else raw
        for raw, item in zip(body["input"], request.input, strict=True)
    ]
    return new


def _texts(value: Any) -> list[str]:
    """The text-carrying strings anywhere inside an output item."""
    if isinstance(value, list):
        return [text for element in value for text in _texts(element)]
    if not isinstance(value, dict):
        return []
    found = [str(value[key]) for key in _TEXT_KEYS if isinstance(value.get(key), str) and value[key]]
    nested = [text for key, element in value.items() if key != "annotations" for text in _texts(element)]
    return found + nested


def answer_text(answer: dict[str, Any]) -> str:
    """The text of a response's output items (messages, refusals, reasoning, tool calls with their names)."""
    parts = []
    for item in answer.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "function_call":
            parts.append(call_text(item))
        elif isinstance(item, dict):
            parts += _texts(item)
    return "\n".join(parts)


def _message_item(message: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_rsafe_{uuid.uuid4().hex}",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": message, "annotations": []}],
    }


def stopped(response: dict[str, Any], message: str) -> dict[str, Any]:
    """The response with its output replaced by the policy's message, ended as incomplete (content_filter)."""
    return {
        **response,
        "status": "incomplete",
        "incomplete_details": {"reason": "content_filter"},
        "output": [_message_item(message)],
    }


def event_text(data: dict[str, Any]) -> str:
    """The text a streamed event adds: any `*.delta` text, and the name of a tool call as it starts."""
    kind = str(data.get("type") or "")
    if kind.endswith(".delta") and isinstance(data.get("delta"), str):
        return str(data["delta"])
    item = data.get("item")
    if kind == "response.output_item.added" and isinstance(item, dict) and item.get("type") == "function_call":
        return str(item.get("name") or "")
    return ""


def stopped_events(template: dict[str, Any], message: str) -> list[dict[str, Any]]:
    """The events that end a stopped stream: the message as text, then the response ended as incomplete."""
    response = template.get("response")
    final = stopped({**(response if isinstance(response, dict) else {}), "object": "response"}, message)
    item = final["output"][0]
    delta = {
        "type": "response.output_text.delta",
        "item_id": item["id"],
        "output_index": 0,
        "content_index": 0,
        "delta": message,
    }
    return [delta, {"type": "response.incomplete", "response": final}]


# Tools the provider runs itself while it answers: the request makes it act (call an MCP server, run code,
# search, read files, drive a computer), so it must not be sent before its input verdict. Function tools
# are run by the client, after the answer, so they are not among them.
_FUNCTION_TOOLS = frozenset({"function", "custom"})


def acts_upstream(body: dict[str, Any]) -> bool:
    """True when the request asks the provider to act while answering: hosted tools, or background mode."""
    tools = body.get("tools")
    hosted = isinstance(tools, list) and any(
        not isinstance(tool, dict) or tool.get("type") not in _FUNCTION_TOOLS for tool in tools
    )
    return hosted or bool(body.get("background")) or body.get("conversation") is not None
