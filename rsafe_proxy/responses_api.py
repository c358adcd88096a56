"""The Responses API (POST /v1/responses): the request fields the proxy reads, the text the guard must see in a
request, an answer or a streamed event, and the answer or events that replace a stopped one."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic

from rsafe_proxy import channels
from rsafe_proxy.bodies import ContentPart, Open, call_text, invalid, message_text, turn_text
from rsafe_proxy.guard.conversation import Turn

# The parts of a response object that the model generated; the rest echoes the request (instructions, tools).
_GENERATED = ("output", "output_text")
# Streamed events that carry nothing but a payload the guard cannot read: stripped whole.
_BINARY_EVENTS = frozenset({"response.audio.delta", "response.image_generation_call.partial_image"})
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


# Input items that carry what a tool returned (besides every `*_output` item): indirect prompt injection.
_TOOL_ITEMS = frozenset({"mcp_call", "mcp_list_tools", "file_search_call", "web_search_call"})


def _item_role(item: InputItem) -> str:
    """The role an input item is judged as (a policy's `input_roles` may switch roles off)."""
    if _is_message(item):
        return str(item.role)
    kind = item.type or ""
    if not kind:
        return "user"  # a shape the proxy does not know is judged as the caller's own
    return "tool" if kind.endswith("_output") or kind in _TOOL_ITEMS else "assistant"


def request_turns(request: ResponsesRequest) -> list[Turn]:
    """What the input screen judges, in order: the instructions (as a system turn), then every input item the
    model reads: messages of any role, tool outputs (function, custom tool, shell, MCP; hosted tools' results
    given back), and the model's own items given back (function and tool calls, reasoning summaries, assistant
    messages). An `item_reference`, `previous_response_id` or `conversation` names content stored upstream,
    which the request does not carry: it was judged when it went through the proxy, but not with this request."""
    turns = [Turn("system", request.instructions, -1)] if request.instructions else []
    if isinstance(request.input, str):
        return [*turns, Turn("user", request.input, 0)] if request.input else turns
    items = (
        Turn(_item_role(item), turn_text(item.model_dump()), position) for position, item in enumerate(request.input)
    )
    return turns + [turn for turn in items if turn.text]


def request_prompt(request: ResponsesRequest) -> str:
    """The user text the answer replies to (the output screen's `User:` line)."""
    if isinstance(request.input, str):
        return request.input
    users = [message_text(item.content) for item in request.input if _is_message(item) and item.role == "user"]
    return users[-1] if users else ""


def _rewritten_item(raw: dict[str, Any], item: InputItem, instruction: str) -> dict[str, Any] | None:
    """The input item with its text replaced by `instruction` (a call keeps its id, with empty arguments, so the
    output answering it still matches); None for an item that has no such form (reasoning, hosted-tool calls)."""
    kind = item.type or ""
    if _is_message(item):
        dropped = ("id", "status") if item.role == "assistant" else ()  # an output item given back: now plain input
        return {**{key: value for key, value in raw.items() if key not in dropped}, "content": instruction}
    if kind.endswith("_output") and kind != "computer_call_output" and "output" in raw:
        return {**raw, "output": instruction}
    if kind == "function_call":
        return {**raw, "arguments": "{}"}
    if kind == "custom_tool_call":
        return {**raw, "input": ""}
    return None


def rewritten(
    body: dict[str, Any], request: ResponsesRequest, judged: Sequence[Turn], instruction: str
) -> dict[str, Any] | None:
    """The request body with the judged turns (instructions, input, input items) replaced by `instruction`;
    None when one of them cannot be replaced (the request is then blocked instead)."""
    positions = {turn.position for turn in judged}
    new = dict(body)
    if request.instructions and -1 in positions:
        new["instructions"] = instruction
    if isinstance(request.input, str):
        if 0 in positions:
            new["input"] = instruction
        return new
    items: list[Any] = []
    for position, (raw, item) in enumerate(zip(body["input"], request.input, strict=True)):
        replaced = _rewritten_item(raw, item, instruction) if position in positions else raw
        if replaced is None:
            return None
        items.append(replaced)
    new["input"] = items
    return new


def read_answer(answer: dict[str, Any], streamed: bool = False) -> channels.Reading:
    """Every channel of a response's output items, judged unless known to be metadata: messages, refusals,
    reasoning summaries and text, function and custom tool calls, and hosted tools' items (MCP calls and tool
    lists, code interpreter code and logs, shell commands, computer actions, web and file searches, images'
    revised prompts); a generated image and other binary payloads are set apart (see channels.read)."""
    generated = {key: answer[key] for key in _GENERATED if key in answer}
    reading = channels.read(generated, call=None if streamed else call_text, streamed=streamed)
    if reading.value is generated:
        return channels.Reading(reading.texts, reading.unjudged, answer)
    rest = {key: value for key, value in answer.items() if key not in generated}
    return channels.Reading(reading.texts, reading.unjudged, {**rest, **reading.value})


def _message_item(message: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_rsafe_{uuid.uuid4().hex}",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": message, "annotations": []}],
    }


def stopped(response: dict[str, Any], message: str) -> dict[str, Any]:
    """The response with its output replaced by the policy's message, ended as incomplete (content_filter):
    nothing of the output it replaces survives (items, reasoning, `output_text`)."""
    stopped = {
        **response,
        "status": "incomplete",
        "incomplete_details": {"reason": "content_filter"},
        "output": [_message_item(message)],
    }
    if "output_text" in response:  # the SDKs' convenience field, which some servers send
        stopped["output_text"] = message
    return stopped


def _read_event(data: dict[str, Any]) -> channels.Reading:
    """Every string of a streamed event, of its response object only the output (see read_answer)."""
    response = data.get("response")
    own = {key: value for key, value in data.items() if key != "response"}
    event = channels.read(own, streamed=True)
    if not isinstance(response, dict):
        return event if event.value is not own else channels.Reading(event.texts, event.unjudged, data)
    answer = read_answer(response, streamed=True)
    value = data if event.value is own and answer.value is response else {**event.value, "response": answer.value}
    return channels.Reading(event.texts + answer.texts, event.unjudged + answer.unjudged, value)


@dataclass
class EventTexts:
    """The new text of each event of one Responses stream. A `*.delta` adds to its part; any other event (a
    `*.done`, an output item, a content part, the final response) adds the strings not already read, so text
    that arrives only there is judged, and text seen as deltas is not judged twice. A done text that differs
    from its deltas is new, and judged whole."""

    parts: dict[tuple[Any, ...], list[str]] = field(default_factory=dict)
    read: set[str] = field(default_factory=set)

    def take(self, data: dict[str, Any]) -> channels.Reading:
        """The event's new text (one text), where its binary payloads were, and the event without them
        (None when nothing is left of it)."""
        kind = str(data.get("type") or "")
        reading = _read_event(data)
        texts = list(reading.texts)
        delta = reading.value.get("delta")
        new = ""
        if kind.endswith(".delta") and isinstance(delta, str):
            key = (data.get("item_id"), data.get("output_index"), data.get("content_index"), data.get("summary_index"))
            part = (*key, kind.removesuffix(".delta"))
            self.parts.setdefault(part, []).append(delta)  # joined only when a done event needs it
            new = delta
            if delta in texts:
                texts.remove(delta)
        known = self.read | {"".join(pieces) for pieces in self.parts.values()} if texts else self.read
        for text in texts:
            if text not in known:
                self.read.add(text)
                known.add(text)
                new += f"\n{text}\n"
        value = None if kind in _BINARY_EVENTS and reading.unjudged else reading.value
        return channels.Reading((new,) if new else (), reading.unjudged, value)


def failed_events(template: dict[str, Any], error: dict[str, Any]) -> list[dict[str, Any]]:
    """The event that ends a stream the upstream broke off: the response, failed with `error` ({code, message})."""
    response = template.get("response")
    known = response if isinstance(response, dict) else {}
    failed = {**known, "object": "response", "status": "failed", "error": error, "output": []}
    failed.pop("output_text", None)
    return [{"type": "response.failed", "response": failed}]


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
