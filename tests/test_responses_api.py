"""POST /v1/responses through the real OpenAI SDK: instructions and input messages screened before the upstream,
the output screened before the client (whole, or streamed in windows), the same errors as chat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.responses import ResponseStreamEvent

from rsafe_proxy.policy.loading import load_policy
from tests.conftest import MakeProxy
from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE, UNSAFE_ANSWER, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.sdk import BLOCKED_OUTPUT, error_of, tenant_policy
from tests.serving import Proxy, write_policy

WORDS = [f"word{n:02d} " for n in range(12)]


def streamed(client: openai.OpenAI, **request: Any) -> list[ResponseStreamEvent]:
    with client.responses.create(model="fake-model", stream=True, **request) as stream:
        return list(stream)


def delta_text(events: list[ResponseStreamEvent]) -> str:
    return "".join(event.delta for event in events if event.type == "response.output_text.delta")


# -- input ------------------------------------------------------------------------------------------------------


def test_a_safe_request_passes_both_screens(proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard) -> None:
    with proxy.client() as client:
        response = client.responses.create(model="fake-model", input="hello there")
    assert response.output_text == "Echo: hello there"
    assert response.status == "completed"
    assert guard.judged("input") == ["hello there"]
    assert guard.judged("output") == ["Echo: hello there"]
    assert upstream.calls("/v1/responses")[0].body["input"] == "hello there"


@pytest.mark.parametrize(
    "request_fields",
    [
        {"input": f"{UNSAFE} now"},
        {"input": [{"role": "user", "content": f"{UNSAFE} now"}]},
        {"input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"{UNSAFE}"}]}]},
        {"input": [{"role": "developer", "content": f"be {UNSAFE}"}, {"role": "user", "content": "hi"}]},
        {"input": "hi", "instructions": f"Always {UNSAFE}."},
    ],
    ids=["string", "message", "input_text part", "developer message", "instructions"],
)
def test_unsafe_input_is_blocked_before_the_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream, request_fields: dict[str, Any]
) -> None:
    proxy = make_proxy(server={"input_screening": "sequential"})
    with proxy.client() as client, pytest.raises(openai.BadRequestError) as blocked:
        client.responses.create(model="fake-model", **request_fields)
    error = error_of(blocked.value)
    assert (error["code"], error["type"]) == ("content_filter", "invalid_request_error")
    assert blocked.value.response.headers["x-should-retry"] == "false"
    assert upstream.calls("/v1/responses") == []


def test_assistant_items_and_tool_outputs_are_judged_in_the_conversation(proxy: Proxy, guard: ScriptedGuard) -> None:
    items: Any = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "an earlier answer"},
        {"type": "function_call_output", "call_id": "call_1", "output": "tool data"},
        {"role": "user", "content": "second"},
    ]
    with proxy.client() as client:
        client.responses.create(model="fake-model", input=items)
    assert guard.judged("input") == [
        "[user] first\n[assistant] an earlier answer\n[tool result] tool data\n[user] second"
    ]


def test_rewrite_replaces_the_flagged_input(make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path, "rewriting", categories=[{"id": "U2", "name": "Weapons & Illegal Tactics", "action": "rewrite"}]
    )
    proxy = tenant_policy(make_proxy, policy)
    items: Any = [{"role": "user", "content": f"{UNSAFE} please", "extra": 1}]
    with proxy.client() as client:
        response = client.responses.create(model="fake-model", input=items, metadata={"kept": "yes"})
    instruction = load_policy(policy).messages.rewrite.input
    assert response.output_text == f"Echo: {instruction}"
    sent = upstream.calls("/v1/responses")[-1].body
    assert sent["input"] == [{"role": "user", "content": instruction, "extra": 1}]
    assert sent["metadata"] == {"kept": "yes"}


@pytest.mark.parametrize(
    ("body", "param"),
    [({"model": "m"}, "input"), ({"model": "m", "input": 7}, "input"), ({"input": "hi"}, "model")],
)
def test_a_malformed_request_is_a_clear_400(proxy: Proxy, upstream: FakeUpstream, body: Any, param: str) -> None:
    with proxy.http() as http:
        response = http.post("/v1/responses", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert upstream.calls() == []


# -- output -----------------------------------------------------------------------------------------------------


def test_an_unsafe_answer_is_replaced_and_marked_incomplete(proxy: Proxy) -> None:
    with proxy.client() as client:
        raw = client.responses.with_raw_response.create(model="fake-model", input=f"{ASK_UNSAFE_ANSWER} now")
    response = raw.parse()
    assert response.output_text == BLOCKED_OUTPUT
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "content_filter"
    assert UNSAFE not in raw.http_response.text
    assert response.id == "resp_fake"  # the rest of the response is the upstream's


def test_tool_call_arguments_are_screened(proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard) -> None:
    upstream.answer_as = "tool_call"
    upstream.answer = UNSAFE_ANSWER
    with proxy.client() as client:
        response = client.responses.create(model="fake-model", input="look it up")
    assert response.output_text == BLOCKED_OUTPUT
    assert [item.type for item in response.output] == ["message"]
    assert guard.judged("output") == [f"lookup({UNSAFE_ANSWER})"]


def test_a_safe_stream_passes_unchanged(proxy: Proxy, guard: ScriptedGuard) -> None:
    with proxy.client() as client:
        events = streamed(client, input="hello")
    assert delta_text(events) == "Echo: hello"
    assert events[-1].type == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(guard.judged("output")) == "Echo: hello"


@pytest.mark.parametrize("mode", ["chunked", "buffer", "async"])
def test_an_unsafe_stream_ends_incomplete_with_the_policys_message(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, mode: str
) -> None:
    policy = write_policy(tmp_path, f"stream-{mode}", stream={"mode": mode, "window_chars": 16, "overlap_chars": 0})
    proxy = tenant_policy(make_proxy, policy)
    upstream.answer = "".join(WORDS) + f"{UNSAFE} and the rest."
    with proxy.client() as client:
        events = streamed(client, input="go")
    text = delta_text(events)
    message = load_policy(policy).messages.block.output
    assert text.endswith(message)
    final = events[-1]
    assert final.type == "response.incomplete"
    assert final.response.incomplete_details is not None
    assert final.response.incomplete_details.reason == "content_filter"
    assert final.response.output_text == message
    assert not any(event.type == "response.completed" for event in events)
    if mode == "buffer":
        assert not text.startswith("word")
    else:
        assert text.startswith("word00") and len(guard.judged("output")) > 1
    if mode != "async":
        assert UNSAFE not in text
