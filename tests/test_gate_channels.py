"""Every channel of a generated answer is judged or removed, a replaced answer leaves nothing of itself, and a
stream the upstream breaks off ends cleanly. Through the real OpenAI SDK (or httpx, for the raw bytes) against
answers and streams the fake upstream sends byte for byte. The Responses API's: test_gate_responses_channels.py,
which uses the builders of bodies and events here."""

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
    return [span for span in map(json.loads, lines) if span["name"].startswith("POST /v1/")]  # screened requests' spans


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
