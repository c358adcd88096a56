"""The decision id inside a stream: the event that ends a stopped stream carries it as its top-level
`decision_id`, an error ending as `error.decision_id`, each the same as the `x-rsafe-decision-id` header; the
OpenAI SDK reads them (it keeps fields it does not know)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import MakeProxy
from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy, write_policy

CHAT = "/v1/chat/completions"


def _events(proxy: Proxy, path: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    """The decision id header and the JSON of each SSE event of a streamed answer ('[DONE]' as a string)."""
    with proxy.http() as http, http.stream("POST", path, json={**body, "stream": True}) as reply:
        assert reply.status_code == 200
        raw = "".join(reply.iter_text())
        decision_id = reply.headers["x-rsafe-decision-id"]
    items: list[Any] = []
    for block in raw.split("\n\n"):
        payload = "\n".join(line[5:].strip() for line in block.split("\n") if line.startswith("data:"))
        if payload:
            items.append(payload if payload == "[DONE]" else json.loads(payload))
    return decision_id, items


def _chat(content: str) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize("mode", ["chunked", "buffer", "async"])
def test_a_stopped_chat_stream_names_its_decision(make_proxy: MakeProxy, tmp_path: Path, mode: str) -> None:
    write_policy(tmp_path, f"s-{mode}", stream={"mode": mode, "window_chars": 16, "overlap_chars": 4})
    proxy = make_proxy(tenants=[{"id": "default", "anonymous": True, "policy": str(tmp_path / f"s-{mode}.yaml")}])
    with proxy.client(max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": ASK_UNSAFE_ANSWER}], stream=True
        )
        chunks = list(raw.parse())
    last = chunks[-1]
    assert last.choices[0].finish_reason == "content_filter"
    released = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert (UNSAFE in released) is (mode == "async")  # async releases text at once, then cuts the stream
    assert (last.model_extra or {})["decision_id"] == raw.headers["x-rsafe-decision-id"]
    assert all("decision_id" not in (chunk.model_extra or {}) for chunk in chunks[:-1])  # on the final chunk only


def test_a_stopped_completion_stream_names_its_decision(proxy: Proxy) -> None:
    decision_id, events = _events(proxy, "/v1/completions", {"model": "fake-model", "prompt": ASK_UNSAFE_ANSWER})
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert events[-2]["decision_id"] == decision_id and len(decision_id) == 32


def test_a_stopped_responses_stream_names_its_decision(proxy: Proxy) -> None:
    with proxy.client(max_retries=0) as client:
        raw = client.responses.with_raw_response.create(model="fake-model", input=ASK_UNSAFE_ANSWER, stream=True)
        events = list(raw.parse())
    last = events[-1]
    assert last.type == "response.incomplete"
    assert (last.model_extra or {})["decision_id"] == raw.headers["x-rsafe-decision-id"]
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "content_filter"


def test_a_broken_chat_stream_names_its_decision_in_the_error(proxy: Proxy, upstream: FakeUpstream) -> None:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "fake-model"}
    upstream.script = [
        f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {'content': 'Hi'}}]})}\n\n".encode()
    ]
    upstream.script_breaks = True
    decision_id, events = _events(proxy, CHAT, _chat("hello"))
    assert events[-1]["error"]["code"] == "upstream_unavailable"
    assert events[-1]["error"]["decision_id"] == decision_id
    with proxy.client(max_retries=0) as client, pytest.raises(openai.APIError) as raised:  # as the SDK sees it
        list(
            client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
    assert isinstance(raised.value.body, dict) and len(raised.value.body["decision_id"]) == 32


def test_a_broken_responses_stream_names_its_decision_in_the_error(proxy: Proxy, upstream: FakeUpstream) -> None:
    created: dict[str, Any] = {
        "type": "response.created",
        "response": {"id": "resp_1", "object": "response", "status": "in_progress"},
    }
    delta: dict[str, Any] = {
        "type": "response.output_text.delta",
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
    }
    upstream.script = [
        f"event: {event['type']}\ndata: {json.dumps({**event, 'sequence_number': n})}\n\n".encode()
        for n, event in enumerate([created, {**delta, "delta": "Hello"}])
    ]
    upstream.script_breaks = True
    decision_id, events = _events(proxy, "/v1/responses", {"model": "fake-model", "input": "hello"})
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["decision_id"] == decision_id


def test_a_stream_cut_by_shutdown_names_its_decision_in_the_error(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.answer = " ".join(f"word{number}" for number in range(60))
    upstream.token_delay_s = 0.2  # 12 s of answer: under way when the proxy is stopped
    policy = write_policy(tmp_path, "small-windows", stream={"window_chars": 40, "overlap_chars": 8})
    proxy = make_proxy(
        server={"shutdown_grace_s": 0.5}, tenants=[{"id": "default", "anonymous": True, "policy": str(policy)}]
    )
    lines: list[str] = []
    headers: dict[str, str] = {}
    first = threading.Event()

    def read() -> None:
        with proxy.http() as http, http.stream("POST", CHAT, json={**_chat("hello"), "stream": True}) as reply:
            headers.update(reply.headers)
            for line in reply.iter_lines():
                lines.append(line)
                first.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert first.wait(10)
        proxy.served.signal()
    finally:
        reader.join(timeout=30)
    last = json.loads([line for line in lines if line.startswith("data: ")][-1].removeprefix("data: "))
    assert last["error"]["code"] == "server_shutting_down"
    assert last["error"]["decision_id"] == headers["x-rsafe-decision-id"]
