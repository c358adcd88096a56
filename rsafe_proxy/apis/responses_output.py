"""The answer and stream side of the Responses API: the text the guard must see in a response object or a
streamed event, and the response or events that replace a stopped one."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from rsafe_proxy.apis import channels
from rsafe_proxy.apis.dialect import EventTexts
from rsafe_proxy.apis.messages import call_text

# The fields of a response object that echo the request (instructions, tools, settings: what the client sent,
# not generated, so not judged again), why it is incomplete, and who pays (`billing`). Every other field is
# judged (see channels.read): `output`, the SDKs' `output_text`, `error`, and any a provider adds.
_ECHOES = frozenset(
    {
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "reasoning",
        "metadata",
        "prompt",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "previous_response_id",
        "conversation",
        "truncation",
        "store",
        "include",
        "temperature",
        "top_p",
        "max_output_tokens",
        "max_tool_calls",
        "frequency_penalty",
        "presence_penalty",
        "incomplete_details",
        "billing",
    }
)
# Streamed events that carry nothing but a payload the guard cannot read: stripped whole.
_BINARY_EVENTS = frozenset({"response.audio.delta", "response.image_generation_call.partial_image"})
# The events that end a streamed response.
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def read_answer(answer: dict[str, Any], streamed: bool = False) -> channels.Reading:
    """Every channel of a response's output items, judged unless known to be metadata: messages, refusals,
    reasoning summaries and text, function and custom tool calls, and hosted tools' items (MCP calls and tool
    lists, code interpreter code and logs, shell commands, computer actions, web and file searches, images'
    revised prompts), and every field of the response beside them that does not echo the request (a provider's
    own); a generated image and other binary payloads are set apart (see channels.read)."""
    generated = {key: value for key, value in answer.items() if key not in _ECHOES}
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
    kept = {key: value for key, value in response.items() if key in _ECHOES or channels.is_metadata(key, value)}
    stopped = {
        **kept,
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
class ResponseEventReader:
    """The new text of each event of one Responses stream. A `*.delta` adds to its part; any other event (a
    `*.done`, an output item, a content part, the final response) adds the strings not already read, so text
    that arrives only there is judged, and text seen as deltas is not judged twice. A done text that differs
    from its deltas is new, and judged whole."""

    parts: dict[tuple[Any, ...], list[str]] = field(default_factory=dict)
    read: set[str] = field(default_factory=set)

    def take(self, data: dict[str, Any]) -> EventTexts:
        """The event's new text (one text, for the one output: position 0), where its binary payloads were, and
        the event without them (None when nothing is left of it)."""
        event_type = str(data.get("type") or "")
        reading = _read_event(data)
        texts = list(reading.texts)
        delta = reading.value.get("delta")
        new = ""
        if event_type.endswith(".delta") and isinstance(delta, str):
            key = (data.get("item_id"), data.get("output_index"), data.get("content_index"), data.get("summary_index"))
            part = (*key, event_type.removesuffix(".delta"))
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
        value = None if event_type in _BINARY_EVENTS and reading.unjudged else reading.value
        return EventTexts([(0, new)] if new else [], reading.unjudged, value)


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
