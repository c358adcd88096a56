"""Every channel of a Responses API answer, streamed or not, is judged or removed (output items of every type,
the output_text field, generated images, text that arrives only in a done event), and a Responses stream that
ends badly ends with response.failed. Through the real OpenAI SDK (or httpx, for the raw bytes) against answers
and events the fake upstream sends byte for byte; the chat API's: test_gate_channels.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.sdk import BLOCKED_OUTPUT, tenant_policy
from tests.serving import Proxy, write_policy
from tests.test_gate_channels import (
    BINARY,
    RESPONSES_BODY,
    blocking_unjudged,
    data_of,
    message_item,
    raw_stream,
    response,
    sse,
)

# -- the Responses API, not streamed ------------------------------------------------------------------------------


HOSTED_ITEMS: dict[str, dict[str, Any]] = {
    "mcp_call output": {
        "type": "mcp_call",
        "id": "m",
        "server_label": "s",
        "name": "f",
        "arguments": "{}",
        "output": UNSAFE,
    },
    "mcp_call error": {
        "type": "mcp_call",
        "id": "m",
        "server_label": "s",
        "name": "f",
        "arguments": "{}",
        "error": UNSAFE,
    },
    "mcp_call arguments": {"type": "mcp_call", "id": "m", "server_label": "s", "name": "f", "arguments": UNSAFE},
    "mcp_list_tools": {
        "type": "mcp_list_tools",
        "id": "l",
        "server_label": "s",
        "tools": [{"name": "f", "description": UNSAFE, "input_schema": {"type": "object"}}],
    },
    "mcp_approval_request": {
        "type": "mcp_approval_request",
        "id": "a",
        "server_label": "s",
        "name": "f",
        "arguments": UNSAFE,
    },
    "code_interpreter code": {
        "type": "code_interpreter_call",
        "id": "c",
        "status": "completed",
        "container_id": "k",
        "code": UNSAFE,
    },
    "code_interpreter logs": {
        "type": "code_interpreter_call",
        "id": "c",
        "status": "completed",
        "container_id": "k",
        "code": "print(1)",
        "outputs": [{"type": "logs", "logs": UNSAFE}],
    },
    "shell command": {
        "type": "shell_call",
        "id": "s",
        "call_id": "c",
        "action": {"commands": ["ls", f"echo {UNSAFE}"]},
    },
    "local shell command": {
        "type": "local_shell_call",
        "id": "s",
        "call_id": "c",
        "status": "completed",
        "action": {"type": "exec", "command": ["bash", "-c", UNSAFE], "env": {}},
    },
    "local shell env": {
        "type": "local_shell_call",
        "id": "s",
        "call_id": "c",
        "status": "completed",
        "action": {"type": "exec", "command": ["env"], "env": {UNSAFE: "1"}},
    },
    "computer action": {
        "type": "computer_call",
        "id": "c",
        "call_id": "c",
        "status": "completed",
        "action": {"type": "type", "text": UNSAFE},
        "pending_safety_checks": [],
    },
    "web search query": {
        "type": "web_search_call",
        "id": "w",
        "status": "completed",
        "action": {"type": "search", "query": UNSAFE},
    },
    "file search results": {
        "type": "file_search_call",
        "id": "f",
        "status": "completed",
        "queries": ["q"],
        "results": [{"file_id": "file_1", "filename": "a.txt", "score": 0.9, "text": UNSAFE}],
    },
    "custom tool input": {"type": "custom_tool_call", "id": "t", "call_id": "c", "name": "f", "input": UNSAFE},
    "reasoning summary": {"type": "reasoning", "id": "r", "summary": [{"type": "summary_text", "text": UNSAFE}]},
    "reasoning text": {
        "type": "reasoning",
        "id": "r",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": UNSAFE}],
    },
    "image revised prompt": {
        "type": "image_generation_call",
        "id": "i",
        "status": "completed",
        "revised_prompt": UNSAFE,
    },
    "refusal": {
        "type": "message",
        "id": "m",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "refusal", "refusal": UNSAFE}],
    },
    "an item type nobody listed": {"type": "future_tool_call", "id": "x", "payload": {"note": UNSAFE}},
}


@pytest.mark.parametrize("item", HOSTED_ITEMS)
def test_every_output_item_is_judged(proxy: Proxy, upstream: FakeUpstream, item: str) -> None:
    upstream.crafted = response([HOSTED_ITEMS[item], message_item("Done.")])
    with proxy.client() as client:
        raw = client.responses.with_raw_response.create(model="fake-model", input="hi")
    answer = raw.parse()
    assert UNSAFE not in raw.http_response.text
    assert answer.output_text == BLOCKED_OUTPUT and answer.status == "incomplete"
    assert [entry.type for entry in answer.output] == ["message"]


def test_a_safe_hosted_tool_item_passes_and_was_judged(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    item = {**HOSTED_ITEMS["mcp_call output"], "output": "The weather is mild."}
    upstream.crafted = response([item])
    with proxy.http() as http:
        body = http.post("/v1/responses", json=RESPONSES_BODY).json()
    assert body["output"] == [item]
    [judged] = guard.judged("output")
    assert "The weather is mild." in judged and "f({})" in judged


def test_the_output_text_field_is_judged_and_replaced(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.crafted = response([message_item("Fine.")], output_text=UNSAFE)
    with proxy.http() as http:
        body = http.post("/v1/responses", json=RESPONSES_BODY).json()
    assert body["output_text"] == BLOCKED_OUTPUT and UNSAFE not in json.dumps(body)


def image_item() -> dict[str, Any]:
    return {"type": "image_generation_call", "id": "i", "status": "completed", "result": BINARY}


def test_a_generated_image_is_stripped(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.crafted = response([image_item(), message_item("Here is your image.")])
    with proxy.client() as client:
        answer = client.responses.create(model="fake-model", input="hi")
    assert answer.output_text == "Here is your image."
    assert answer.output[0].type == "image_generation_call" and answer.output[0].result is None


def test_a_generated_image_is_blocked_when_the_policy_says_so(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy, message = blocking_unjudged(make_proxy, tmp_path)
    upstream.crafted = response([image_item(), message_item("Here is your image.")])
    with proxy.client() as client:
        answer = client.responses.create(model="fake-model", input="hi")
    assert answer.output_text == message and answer.status == "incomplete"


# -- Responses streams ---------------------------------------------------------------------------------------------


def created() -> dict[str, Any]:
    return {"type": "response.created", "response": response([], status="in_progress")}


def added(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "response.output_item.added", "output_index": 0, "item": item}


def text_delta(text: str) -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
        "delta": text,
    }


def completed(output: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "response.completed", "response": response(output)}


def streamed(proxy: Proxy) -> list[Any]:
    with proxy.client() as client, client.responses.create(model="fake-model", input="hi", stream=True) as stream:
        return list(stream)


EMPTY_MESSAGE = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}
POSITION = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
ONLY_IN = {
    "output_item.done": [{"type": "response.output_item.done", "output_index": 0, "item": message_item(UNSAFE)}],
    "content_part.done": [
        {
            "type": "response.content_part.done",
            **POSITION,
            "part": {"type": "output_text", "text": UNSAFE, "annotations": []},
        }
    ],
    "output_text.done": [{"type": "response.output_text.done", **POSITION, "text": UNSAFE}],
    "code_interpreter_call_code.done": [
        {"type": "response.code_interpreter_call_code.done", "item_id": "c", "output_index": 0, "code": UNSAFE}
    ],
    "mcp_call output in its item": [
        {"type": "response.mcp_call.completed", "item_id": "m", "output_index": 0},
        {"type": "response.output_item.done", "output_index": 0, "item": HOSTED_ITEMS["mcp_call output"]},
    ],
}


@pytest.mark.parametrize("where", ONLY_IN)
def test_text_that_arrives_only_in_a_done_event_is_judged(proxy: Proxy, upstream: FakeUpstream, where: str) -> None:
    upstream.script = sse(created(), added(EMPTY_MESSAGE), *ONLY_IN[where], completed([message_item("Fine.")]))
    events = streamed(proxy)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == BLOCKED_OUTPUT
    assert UNSAFE not in json.dumps([event.model_dump() for event in events])


@pytest.mark.parametrize("mode", ["chunked", "buffer", "async"])
def test_safe_deltas_then_an_unsafe_final_response_are_stopped(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path, mode: str
) -> None:
    proxy = tenant_policy(make_proxy, write_policy(tmp_path, f"s-{mode}", stream={"mode": mode}))
    done = {"type": "response.output_item.done", "output_index": 0, "item": message_item("Hello there.")}
    upstream.script = sse(
        created(),
        added(EMPTY_MESSAGE),
        text_delta("Hello "),
        text_delta("there."),
        done,
        completed([message_item(UNSAFE)]),
    )
    events = streamed(proxy)
    assert not any(event.type == "response.completed" for event in events)
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == BLOCKED_OUTPUT
    numbers = [event.sequence_number for event in events]
    assert numbers == sorted(set(numbers))  # the proxy's own events continue the upstream's count
    assert UNSAFE not in json.dumps([event.model_dump() for event in events])


def test_text_seen_as_deltas_is_not_judged_again_and_a_different_done_text_is_judged_whole(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    same = message_item("Hello there.")
    upstream.script = sse(
        created(),
        added(EMPTY_MESSAGE),
        text_delta("Hello "),
        text_delta("there."),
        {"type": "response.output_text.done", **POSITION, "text": "Hello there."},
        {"type": "response.output_item.done", "output_index": 0, "item": same},
        completed([same]),
    )
    assert streamed(proxy)[-1].type == "response.completed"
    assert guard.judged("output") == ["Hello there."]

    other = message_item("Hello there, and more.")
    upstream.script = sse(
        created(),
        added(EMPTY_MESSAGE),
        text_delta("Hello "),
        text_delta("there."),
        {"type": "response.output_text.done", **POSITION, "text": "Hello there, and more."},
        completed([other]),
    )
    assert streamed(proxy)[-1].type == "response.completed"
    assert "Hello there, and more." in guard.judged("output")[-1]


def test_streamed_audio_and_partial_images_are_stripped_from_a_responses_stream(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    upstream.script = sse(
        created(),
        {"type": "response.audio.delta", "response_id": "resp_1", "delta": BINARY},
        {"type": "response.audio.transcript.delta", "response_id": "resp_1", "delta": "Hi there."},
        {
            "type": "response.image_generation_call.partial_image",
            "item_id": "i",
            "output_index": 0,
            "partial_image_b64": BINARY,
        },
        completed([image_item()]),
    )
    raw = raw_stream(proxy, "/v1/responses", RESPONSES_BODY)
    assert BINARY not in raw
    types = [event["type"] for event in data_of(raw)]
    assert types == ["response.created", "response.audio.transcript.delta", "response.completed"]
    assert guard.judged("output") == ["Hi there."]


@pytest.mark.parametrize("breaks", [True, False], ids=["connection broken", "ended before its last event"])
def test_a_responses_stream_that_ends_badly_ends_with_response_failed(
    proxy: Proxy, upstream: FakeUpstream, breaks: bool
) -> None:
    upstream.script = sse(created(), added(EMPTY_MESSAGE), text_delta("Hello "), text_delta("world"))
    upstream.script_breaks = breaks
    events = streamed(proxy)
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == "Hello world"
    final = events[-1]
    assert final.type == "response.failed"
    assert final.response.status == "failed"
    assert final.response.error is not None and final.response.error.code == "upstream_unavailable"
