"""The Responses API (POST /v1/responses): the request fields the proxy reads, the turns of its instructions
and input items, a rewritten request; and the dialect, whose answer and stream side is in responses_output."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pydantic

from rsafe_proxy.apis import choices, fields, responses_output
from rsafe_proxy.apis.dialect import AnswerFacts, AnswerTexts, Validated, answer_facts
from rsafe_proxy.apis.messages import ContentPart, Open, invalid, message_text, turn_text
from rsafe_proxy.apis.responses_output import FINAL_EVENTS, ResponseEventReader
from rsafe_proxy.errors import ProxyError, UpstreamUnavailable
from rsafe_proxy.guard.conversation import Turn

# Where a Responses request keeps the text read as its turns.
_TURN_KEYS = frozenset({"input", "instructions"})


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
    item_type = item.type or ""
    if not item_type:
        return "user"  # a shape the proxy does not know is judged as the caller's own
    return "tool" if item_type.endswith("_output") or item_type in _TOOL_ITEMS else "assistant"


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
    item_type = item.type or ""
    if _is_message(item):
        dropped = ("id", "status") if item.role == "assistant" else ()  # an output item given back: now plain input
        return {**{key: value for key, value in raw.items() if key not in dropped}, "content": instruction}
    if item_type.endswith("_output") and item_type != "computer_call_output" and "output" in raw:
        return {**raw, "output": instruction}
    if item_type == "function_call":
        return {**raw, "arguments": "{}"}
    if item_type == "custom_tool_call":
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


def facts(value: Any) -> AnswerFacts:
    """What a response, or a stream event carrying one, tells about itself: its finish reason is why it is
    incomplete, else its status."""
    if not isinstance(value, Mapping):
        return AnswerFacts()
    if isinstance(inner := value.get("response"), Mapping):  # stream events carry the response
        value = inner
    reasons: tuple[str, ...] = ()
    if value.get("object") == "response" and isinstance(status := value.get("status"), str):
        details = value.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, Mapping) else None
        reasons = (reason if isinstance(reason, str) else status,)
    return answer_facts(value, reasons)


class ResponsesDialect:
    """The Responses API: one output per answer (position 0), streams of typed, numbered events that end with
    their last event."""

    name = "responses"
    operation = "chat"
    end_marker = b""
    strict_end = True

    # -- request side ---------------------------------------------------------------------------------------

    def validated(self, body: dict[str, Any]) -> Validated[ResponsesRequest]:
        """The request checked, its instructions and items as turns after its other fields and offered tools."""
        request = validate_responses(body)
        turns = fields.offered(_TURN_KEYS, body, request_turns(request))
        return Validated(request, turns, request_prompt(request))

    def acts_upstream(self, body: dict[str, Any]) -> bool:
        """True for hosted tools, background mode or a stored conversation (see acts_upstream)."""
        return acts_upstream(body)

    def rewritten(
        self, body: dict[str, Any], request: ResponsesRequest, judged: list[Turn], instruction: str
    ) -> dict[str, Any] | None:
        """See rewritten; the request's other fields go when they were judged."""
        return rewritten(fields.rewrite_base(_TURN_KEYS, body, judged), request, judged, instruction)

    # -- answer side ----------------------------------------------------------------------------------------

    def answer(self, value: Any) -> dict[str, Any]:
        """A response object the proxy can screen (its output, a list), else UpstreamUnavailable."""
        if not isinstance(value, dict) or not isinstance(value.get("output"), list):
            raise UpstreamUnavailable("The upstream model sent an answer the proxy cannot read.")
        return value

    def stored_answers(self, value: Any) -> list[Any] | None:
        """The items of a list of stored responses, read as any OpenAI list is (see choices.listed_answers)."""
        return choices.listed_answers(value)

    def with_answers(self, value: dict[str, Any], answers: list[dict[str, Any]]) -> dict[str, Any]:
        """The list holding `answers` (see choices.with_listed)."""
        return choices.with_listed(value, answers)

    def stored_body(self, method: str, body: bytes) -> bytes:
        """No body: a fetch and a cancel take none, so none is sent."""
        return b""

    def read_answer(self, answer: dict[str, Any]) -> AnswerTexts:
        """The whole output as one text (see responses_output.read_answer)."""
        output = responses_output.read_answer(answer)
        at = frozenset({0}) if output.unjudged else frozenset()
        return AnswerTexts(["\n".join(output.texts)], output.unjudged, at, output.value)

    def replaced(self, answer: dict[str, Any], reading: AnswerTexts, stops: Mapping[int, str]) -> dict[str, Any]:
        """The stripped response, or, stopped, the response with its output replaced (see stopped)."""
        return responses_output.stopped(answer, stops[0]) if stops else reading.value

    def facts(self, value: Any) -> AnswerFacts:
        """See facts."""
        return facts(value)

    # -- stream side ----------------------------------------------------------------------------------------

    def reader(self) -> ResponseEventReader:
        """A reader that remembers the text already seen as deltas."""
        return ResponseEventReader()

    def names_answer(self, data: dict[str, Any]) -> bool:
        """An event with the response object: the latest one names the answer."""
        return "response" in data

    def choices_of(self, data: dict[str, Any]) -> tuple[set[int], set[int]]:
        """None for its own events; an event that carries choices anyway is counted as a chunk is, so that no
        stream has more of them judged than one may ask for."""
        return choices.choices_of(data)

    def is_final(self, data: dict[str, Any] | None) -> bool:
        """The Responses API's last event (completed, incomplete, failed)."""
        return data is not None and data.get("type") in FINAL_EVENTS

    def ends_stream(self, data: dict[str, Any] | None) -> bool:
        """Its last event ends the stream too."""
        return self.is_final(data)

    def cut_events(self, template: dict[str, Any], index: int, message: str) -> list[dict[str, Any]]:
        """The message as text, then the response ended as incomplete (see stopped_events)."""
        return responses_output.stopped_events(template, message)

    def failed_events(
        self, template: dict[str, Any], failure: ProxyError, known: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """The response, failed with the failure's own code (`content_too_long`, `guard_unavailable`, ...; one with
        none as a server_error) and its message."""
        error = {"code": failure.code or "server_error", "message": failure.message, **known}
        return responses_output.failed_events(template, error)

    def event_name(self, data: dict[str, Any]) -> str | None:
        """Its `type`: the Responses API names each event so."""
        name = data.get("type")
        return name if isinstance(name, str) else None

    def sequence_of(self, data: dict[str, Any]) -> int | None:
        """Its `sequence_number`."""
        number = data.get("sequence_number")
        return number if isinstance(number, int) and not isinstance(number, bool) else None

    def numbered(self, data: dict[str, Any], number: int) -> dict[str, Any]:
        """The event with `number` as its `sequence_number`."""
        return {**data, "sequence_number": number}


RESPONSES = ResponsesDialect()
