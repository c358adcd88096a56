"""Every channel of a generated answer is judged or removed, a replaced answer leaves nothing of itself, and a
stream the upstream breaks off ends cleanly. Through the real OpenAI SDK (or httpx, for the raw bytes) against
answers and streams the fake upstream sends byte for byte."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import openai
import pytest

from rsafe_proxy.apis.channels import read
from rsafe_proxy.policy.loading import load_policy
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, UNSAFE_ANSWER, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.sdk import BLOCKED_OUTPUT, tenant_policy, user
from tests.serving import Proxy, write_policy

# A payload no guard reads: base64 of binary data (audio, an image).
BINARY = base64.b64encode(bytes(range(256)) * 3).decode()
CHAT_BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
RESPONSES_BODY = {"model": "fake-model", "input": "hi"}


def sse(*events: dict[str, Any] | str) -> list[bytes | float]:
    """The events as SSE bytes (a Responses API event named by its type and numbered; a string sent as the data)."""
    out: list[bytes | float] = []
    for number, event in enumerate(events):
        if isinstance(event, str):
            out.append(f"data: {event}\n\n".encode())
        elif "type" in event:
            numbered = {**event, "sequence_number": number}
            out.append(f"event: {event['type']}\ndata: {json.dumps(numbered)}\n\n".encode())
        else:
            out.append(f"data: {json.dumps(event)}\n\n".encode())
    return out


def completion(message: dict[str, Any], **choice: Any) -> dict[str, Any]:
    body = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop", **choice}
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake-model", "choices": [body]}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **choice: Any) -> dict[str, Any]:
    body = {"index": 0, "delta": delta or {}, "finish_reason": finish, **choice}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fake-model",
        "choices": [body],
    }


def response(output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": "fake-model",
        "output": output,
        "tools": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        **extra,
    }


def message_item(text: str, item_id: str = "msg_1") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {"type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [part]}


def raw_stream(proxy: Proxy, path: str, body: dict[str, Any]) -> str:
    """The bytes of a streamed answer as the client receives them."""
    with proxy.http() as http, http.stream("POST", path, json={**body, "stream": True}) as reply:
        assert reply.status_code == 200
        return "".join(reply.iter_text())


def data_of(raw: str) -> list[Any]:
    """The JSON of each SSE event in `raw` ('[DONE]' as a string)."""
    items: list[Any] = []
    for block in raw.split("\n\n"):
        payload = "\n".join(line[5:].strip() for line in block.split("\n") if line.startswith("data:"))
        if payload:
            items.append(payload if payload == "[DONE]" else json.loads(payload))
    return items


def request_spans(proxy: Proxy) -> list[dict[str, Any]]:
    proxy.stop()  # the lifespan flushes the spans
    lines = proxy.spans_file.read_text(encoding="utf-8").splitlines()
    return [span for span in map(json.loads, lines) if span["name"] == "rsafe.request"]


def blocking_unjudged(make_proxy: MakeProxy, tmp_path: Path, **stream: Any) -> tuple[Proxy, str]:
    policy = write_policy(tmp_path, "unjudged-block", unjudged="block", **({"stream": stream} if stream else {}))
    return tenant_policy(make_proxy, policy), load_policy(policy).messages.block.output


# -- what is read where -----------------------------------------------------------------------------------------


def test_a_field_nobody_listed_is_judged_and_metadata_is_not() -> None:
    reading = read({"id": "x", "role": "assistant", "type": "t", "index": 3, "future_field": {"deep": ["words"]}})
    assert reading.texts == ("words",)
    assert reading.unjudged == ()


def test_binary_payloads_are_set_apart_and_a_transcript_covers_whole_audio() -> None:
    audio = {"id": "a", "data": BINARY, "expires_at": 1, "transcript": "hello"}
    whole = read({"audio": audio})
    assert whole.texts == ("hello",) and whole.unjudged == () and whole.value["audio"]["data"] == BINARY
    streamed = read({"audio": audio}, streamed=True)  # streamed audio runs ahead of the transcript judged so far
    assert streamed.unjudged == ("audio.data",) and "data" not in streamed.value["audio"]
    image = read({"outputs": [{"type": "image", "url": f"data:image/png;base64,{BINARY[:40]}"}, {"logs": "ok"}]})
    assert image.unjudged == ("outputs.0.url",) and image.texts == ("ok",)


# -- chat and completions, not streamed --------------------------------------------------------------------------


def test_a_replaced_chat_answer_leaves_nothing_of_itself(proxy: Proxy, upstream: FakeUpstream) -> None:
    token = {"token": UNSAFE, "logprob": -0.1, "bytes": [85], "top_logprobs": [{"token": UNSAFE, "logprob": -0.2}]}
    citation = {"url": f"https://x.test/{UNSAFE}", "title": UNSAFE, "start_index": 0, "end_index": 4}
    upstream.crafted = {
        **completion(
            {
                "content": UNSAFE_ANSWER,
                "annotations": [{"type": "url_citation", "url_citation": citation}],
                "audio": {"id": "audio_1", "data": BINARY, "expires_at": 1, "transcript": UNSAFE_ANSWER},
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "go", "arguments": UNSAFE}}],
                "reasoning_content": UNSAFE,
            },
            logprobs={"content": [token], "refusal": [token]},
            provider_detail={"note": UNSAFE},
        ),
        "citations": [f"https://x.test/{UNSAFE}"],
    }
    with proxy.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=user("hi"), logprobs=True)
    answer = raw.parse()
    assert UNSAFE not in raw.http_response.text and BINARY not in raw.http_response.text
    choice = answer.choices[0]
    assert choice.message.content == BLOCKED_OUTPUT and choice.finish_reason == "content_filter"
    assert choice.logprobs is None and choice.message.audio is None and choice.message.tool_calls is None


CHAT_CHANNELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "refusal": ({"content": "Fine.", "refusal": UNSAFE}, {}),
    "reasoning": ({"content": None, "reasoning": UNSAFE}, {}),
    "reasoning_content": ({"content": None, "reasoning_content": UNSAFE}, {}),
    "audio transcript": (
        {"content": None, "audio": {"id": "a", "data": BINARY, "expires_at": 1, "transcript": UNSAFE}},
        {},
    ),
    "tool call": (
        {"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": UNSAFE}}]},
        {},
    ),
    "function call": ({"function_call": {"name": "f", "arguments": UNSAFE}}, {}),
    "annotation": (
        {"content": "Fine.", "annotations": [{"type": "url_citation", "url_citation": {"title": UNSAFE}}]},
        {},
    ),
    "a provider's new field": ({"content": "Fine.", "thoughts": {"steps": [UNSAFE]}}, {}),
    "a choice's extra": ({"content": "Fine."}, {"provider_detail": {"note": UNSAFE}}),
}


@pytest.mark.parametrize("channel", CHAT_CHANNELS)
def test_every_channel_of_a_chat_answer_is_judged(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard, channel: str
) -> None:
    message, extra = CHAT_CHANNELS[channel]
    upstream.crafted = completion(message, **extra)
    with proxy.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=user("hi"))
    assert raw.parse().choices[0].message.content == BLOCKED_OUTPUT
    assert UNSAFE not in raw.http_response.text
    assert any(UNSAFE in text for text in guard.judged("output"))


def test_text_beside_the_choices_is_judged_and_removed_with_the_first(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.crafted = {**completion({"content": "Fine."}), "search_results": [{"snippet": UNSAFE}]}
    with proxy.http() as http:
        body = http.post("/v1/chat/completions", json=CHAT_BODY).json()
    assert "search_results" not in body
    assert body["choices"][0]["message"]["content"] == BLOCKED_OUTPUT


def test_a_replaced_completion_keeps_no_logprobs(proxy: Proxy, upstream: FakeUpstream) -> None:
    logprobs = {"tokens": [UNSAFE], "token_logprobs": [-0.1], "top_logprobs": [{UNSAFE: -0.1}], "text_offset": [0]}
    choice = {"index": 0, "text": UNSAFE_ANSWER, "finish_reason": "stop", "logprobs": logprobs}
    upstream.crafted = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
    with proxy.client() as client:
        raw = client.completions.with_raw_response.create(model="fake-model", prompt="hi", logprobs=1)
    answer = raw.parse()
    assert UNSAFE not in raw.http_response.text
    assert answer.choices[0].text == BLOCKED_OUTPUT and answer.choices[0].logprobs is None


def test_a_safe_audio_answer_keeps_its_audio_once_its_transcript_is_judged(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    audio = {"id": "audio_1", "data": BINARY, "expires_at": 1, "transcript": "A calm story."}
    upstream.crafted = completion({"content": None, "audio": audio})
    with proxy.client() as client:
        answer = client.chat.completions.create(model="fake-model", messages=user("hi"))
    assert answer.choices[0].message.audio is not None and answer.choices[0].message.audio.data == BINARY
    assert guard.judged("output") == ["A calm story."]


def test_audio_without_a_transcript_is_stripped_and_recorded(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.crafted = completion(
        {"content": "Here it is.", "audio": {"id": "audio_1", "data": BINARY, "expires_at": 1}}
    )
    with proxy.http() as http:
        body = http.post("/v1/chat/completions", json=CHAT_BODY).json()
    message = body["choices"][0]["message"]
    assert message["content"] == "Here it is." and message["audio"] == {"id": "audio_1", "expires_at": 1}
    [span] = request_spans(proxy)
    assert span["attributes"]["rsafe.unjudged"] == ["choices.0.message.audio.data"]
    assert span["attributes"]["rsafe.unjudged.action"] == "strip"


def test_audio_without_a_transcript_is_blocked_when_the_policy_says_so(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy, message = blocking_unjudged(make_proxy, tmp_path)
    upstream.crafted = completion(
        {"content": "Here it is.", "audio": {"id": "audio_1", "data": BINARY, "expires_at": 1}}
    )
    with proxy.http() as http:
        reply = http.post("/v1/chat/completions", json=CHAT_BODY)
    assert BINARY not in reply.text
    choice = reply.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": message}
    assert choice["finish_reason"] == "content_filter"


def test_an_answer_nested_deeper_than_any_answer_is_stripped_not_a_crash(proxy: Proxy, upstream: FakeUpstream) -> None:
    deep: dict[str, Any] = {"note": UNSAFE}
    for _ in range(900):
        deep = {"inner": deep}
    upstream.crafted = completion({"content": "Fine.", "provider_detail": deep})
    with proxy.http() as http:
        reply = http.post("/v1/chat/completions", json=CHAT_BODY)
    assert reply.status_code == 200
    assert UNSAFE not in reply.text and reply.json()["choices"][0]["message"]["content"] == "Fine."


@pytest.mark.parametrize("unjudged", ["strip", "block"])
def test_a_binary_payload_beside_the_choices_follows_the_policy(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path, unjudged: str
) -> None:
    policy = write_policy(tmp_path, f"unjudged-{unjudged}", unjudged=unjudged)
    upstream.crafted = {**completion({"content": "Fine."}), "image": {"b64_json": BINARY}, "note": "kept"}
    with tenant_policy(make_proxy, policy).http() as http:
        body = http.post("/v1/chat/completions", json=CHAT_BODY).json()
    assert BINARY not in json.dumps(body)
    if unjudged == "strip":
        assert body["image"] == {} and body["note"] == "kept" and body["choices"][0]["message"]["content"] == "Fine."
    else:
        assert "note" not in body and body["choices"][0]["finish_reason"] == "content_filter"


# -- chat streams -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["chunked", "buffer"])
def test_a_cut_stream_releases_no_logprobs(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path, mode: str
) -> None:
    proxy = tenant_policy(make_proxy, write_policy(tmp_path, f"s-{mode}", stream={"mode": mode}))

    def piece(text: str) -> dict[str, Any]:
        return chunk({"content": text}, logprobs={"content": [{"token": text, "logprob": -0.1, "top_logprobs": []}]})

    upstream.script = sse(chunk({"role": "assistant"}), piece("Sure. "), piece(UNSAFE), chunk(finish="stop"), "[DONE]")
    events = data_of(raw_stream(proxy, "/v1/chat/completions", CHAT_BODY))
    assert UNSAFE not in json.dumps(events)
    *_, final, done = events
    assert done == "[DONE]"
    assert final["choices"] == [{"index": 0, "delta": {"content": BLOCKED_OUTPUT}, "finish_reason": "content_filter"}]


CHUNK_CHANNELS = {
    "reasoning": chunk({"content": "ok ", "reasoning": UNSAFE}),
    "refusal": chunk({"refusal": UNSAFE}),
    "audio transcript": chunk({"audio": {"id": "a", "transcript": UNSAFE}}),
    "tool call": chunk({"tool_calls": [{"index": 0, "function": {"arguments": UNSAFE}}]}),
    "a provider's new field": chunk({"content": "ok", "provider_note": UNSAFE}),
    "a choice's extra": chunk({"content": "ok"}, annotations=[{"title": UNSAFE}]),
    "a chunk's extra": {**chunk({"content": "ok"}), "citations": [UNSAFE]},
}


@pytest.mark.parametrize("channel", CHUNK_CHANNELS)
def test_every_field_of_a_chunk_that_carries_text_is_judged(proxy: Proxy, upstream: FakeUpstream, channel: str) -> None:
    upstream.script = sse(chunk({"role": "assistant"}), CHUNK_CHANNELS[channel], chunk(finish="stop"), "[DONE]")
    with (
        proxy.client() as client,
        client.chat.completions.create(model="fake-model", messages=user("hi"), stream=True) as stream,
    ):
        chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert UNSAFE not in json.dumps([piece.model_dump() for piece in chunks])


def test_what_an_event_carries_besides_its_data_is_not_sent_unjudged(proxy: Proxy, upstream: FakeUpstream) -> None:
    first, finish = (
        json.dumps(piece).encode() for piece in (chunk({"role": "assistant", "content": "Hi"}), chunk(finish="stop"))
    )
    upstream.script = [
        f": {UNSAFE}\n\n".encode(),  # a comment
        f"id: {UNSAFE}\nevent: {UNSAFE}\ndata: ".encode() + first + b"\n\n",
        f"{UNSAFE}\n\n".encode(),  # no SSE field at all
        b"data: " + finish + b"\n\ndata: [DONE]\n\n",
    ]
    raw = raw_stream(proxy, "/v1/chat/completions", CHAT_BODY)
    assert UNSAFE not in raw
    assert [event["choices"][0]["delta"].get("content") for event in data_of(raw)[:-1]] == ["Hi", None]


def audio_stream() -> list[bytes | float]:
    return sse(
        chunk({"role": "assistant", "audio": {"id": "audio_1", "transcript": "Once "}}),
        chunk({"audio": {"data": BINARY}}),
        chunk({"audio": {"transcript": "upon a time."}}),
        chunk(finish="stop"),
        "[DONE]",
    )


def test_streamed_audio_data_is_stripped_and_its_transcript_judged(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    upstream.script = audio_stream()
    raw = raw_stream(proxy, "/v1/chat/completions", CHAT_BODY)
    assert BINARY not in raw
    transcript = "".join(
        choice["delta"].get("audio", {}).get("transcript", "")
        for event in data_of(raw)
        if isinstance(event, dict)
        for choice in event["choices"]
    )
    assert transcript == "Once upon a time."
    assert guard.judged("output") == ["Once upon a time."]
    assert raw.endswith("data: [DONE]\n\n")


def test_streamed_audio_data_cuts_the_stream_when_the_policy_blocks_it(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy, message = blocking_unjudged(make_proxy, tmp_path)
    upstream.script = audio_stream()
    events = data_of(raw_stream(proxy, "/v1/chat/completions", CHAT_BODY))
    assert BINARY not in json.dumps(events)
    assert events[-2]["choices"] == [{"index": 0, "delta": {"content": message}, "finish_reason": "content_filter"}]


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


# -- streams that end badly ----------------------------------------------------------------------------------------


def stream_until_error(proxy: Proxy) -> tuple[str, openai.APIError]:
    """The text a chat stream delivered before the SDK raised the error it ended with."""
    text = ""
    with (
        proxy.client() as client,
        client.chat.completions.create(model="fake-model", messages=user("hi"), stream=True) as stream,
    ):
        try:
            for piece in stream:
                text += "".join(choice.delta.content or "" for choice in piece.choices)
        except openai.APIError as error:
            return text, error
    raise AssertionError(f"the stream ended without an error after {text!r}")


@pytest.mark.parametrize("mode", ["chunked", "buffer", "async"])
def test_a_broken_chat_stream_delivers_the_screened_text_then_an_error(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path, mode: str
) -> None:
    proxy = tenant_policy(make_proxy, write_policy(tmp_path, f"s-{mode}", stream={"mode": mode}))
    upstream.script = sse(chunk({"role": "assistant"}), chunk({"content": "Hello "}), chunk({"content": "world"}))
    upstream.script_breaks = True
    text, error = stream_until_error(proxy)
    assert text == "Hello world"
    assert error.code == "upstream_unavailable"
    assert not isinstance(error, openai.APIStatusError)  # the stream itself ended with the error


def test_a_broken_stream_with_unsafe_pending_text_is_cut_as_a_violation(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.script = sse(chunk({"role": "assistant"}), chunk({"content": "Hello "}), chunk({"content": UNSAFE}))
    upstream.script_breaks = True
    events = data_of(raw_stream(proxy, "/v1/chat/completions", CHAT_BODY))
    assert UNSAFE not in json.dumps(events)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "content_filter"


def test_a_chat_stream_that_breaks_after_it_finished_ends_normally(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.script = sse(chunk({"role": "assistant", "content": "Hello"}), chunk(finish="stop"))
    upstream.script_breaks = True
    with (
        proxy.client() as client,
        client.chat.completions.create(model="fake-model", messages=user("hi"), stream=True) as stream,
    ):
        chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_garbage_instead_of_a_stream_is_an_error_not_an_empty_answer(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.script = [b"<html><body>502 Bad Gateway</body></html>"]
    text, error = stream_until_error(proxy)
    assert text == "" and error.code == "upstream_unavailable"


def test_a_stalled_stream_ends_with_a_timeout_error(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    proxy = make_proxy(upstream={"timeout_s": 0.5})
    upstream.script = [*sse(chunk({"role": "assistant", "content": "Hello"})), 1.5]
    events = data_of(raw_stream(proxy, "/v1/chat/completions", CHAT_BODY))
    assert events[0]["choices"][0]["delta"]["content"] == "Hello"
    assert events[-1]["error"]["code"] == "upstream_timeout" and events[-1]["error"]["type"] == "server_error"


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
    assert final.response.error is not None and final.response.error.code == "server_error"
