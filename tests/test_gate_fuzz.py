"""Property-based fuzzing of the gate (hypothesis): request bodies and upstream SSE streams, generated, sent
through the real proxy on loopback. Whatever arrives, the proxy answers without a 5xx of its own, and no text
the scripted guard would call unsafe reaches the model (input, sequential screening) or the client (output)."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import MakeProxy
from tests.doubles import UNSAFE
from tests.serving import Proxy, Servers

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def _visible(text: str) -> str:
    """What a reader (a model, a person) makes of `text`: NFKC, format characters dropped."""
    folded = unicodedata.normalize("NFKC", text)
    return "".join(char for char in folded if unicodedata.category(char) != "Cf")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _unsafe_in(texts: Iterator[str] | list[str]) -> list[str]:
    return [text for text in texts if UNSAFE in _visible(text)]


@dataclass
class ScriptedUpstream:
    """An upstream that answers with what the test scripts: `stream` (raw SSE byte pieces) or an echo of every
    string in the request (the worst model: it repeats whatever it read, from any field)."""

    url: str = ""
    stream: list[bytes] = field(default_factory=list)
    received: list[Any] = field(default_factory=list)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/{path:path}", self._answer, methods=["POST"])])

    async def _answer(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.received.append(body)
        if body.get("stream"):
            pieces = list(self.stream)

            async def send() -> AsyncIterator[bytes]:
                for piece in pieces:
                    yield piece

            return StreamingResponse(send(), media_type="text/event-stream")
        echo = " ".join(_strings(body))
        if request.url.path.endswith("/responses"):
            item = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": echo}]}
            return JSONResponse({"id": "resp_1", "object": "response", "status": "completed", "output": [item]})
        message = {"role": "assistant", "content": echo}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return JSONResponse({"id": "c1", "object": "chat.completion", "model": "m", "choices": [choice]})


@pytest.fixture
def scripted(servers: Servers) -> ScriptedUpstream:
    double = ScriptedUpstream()
    double.url = servers.start(double.app, lifespan="off").url
    return double


@pytest.fixture
def fuzz_proxy(make_proxy: MakeProxy, scripted: ScriptedUpstream) -> Proxy:
    return make_proxy(
        server={"input_screening": "sequential"},
        upstream={"base_url": f"{scripted.url}/v1"},
    )


# -- text: words, the marker whole, split, or hidden behind characters a reader reads through ----------------------

_HIDDEN = st.sampled_from(
    [
        UNSAFE,
        UNSAFE.replace("-", "\u200b-\u200b"),  # zero-width spaces
        UNSAFE.replace("S", "\uff33"),  # fullwidth S, NFKC folds it back
        "\u2060".join(UNSAFE),  # word joiners between every letter
        UNSAFE.replace("A", "A\u00ad"),  # soft hyphen
    ]
)
_WORDS = st.sampled_from(["hello", "the", "plan", " ", "\n", "é", "日本", '"', "\\", "</think>", "\\boxed{safe}"])
TEXT = st.lists(st.one_of(_WORDS, _HIDDEN), min_size=1, max_size=6).map("".join)


# -- request bodies ---------------------------------------------------------------------------------------------

_ROLE = st.sampled_from(["user", "system", "developer", "assistant", "tool", "function"])


@st.composite
def _message(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(_ROLE)
    text = draw(TEXT)
    content: Any = draw(st.sampled_from(["string", "parts", "none"]))
    message: dict[str, Any] = {"role": role}
    if content == "string":
        message["content"] = text
    elif content == "parts":
        message["content"] = [{"type": "text", "text": piece} for piece in [text, draw(TEXT)]]
    else:
        message["content"] = None
    if role == "tool":
        message["tool_call_id"] = "call_1"
    if role == "function":
        message["name"] = "lookup"
    if role == "assistant" and draw(st.booleans()):
        message["tool_calls"] = [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": draw(TEXT)}}
        ]
    return message


CHAT_BODY = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.lists(_message(), min_size=1, max_size=5)},
    optional={"temperature": st.floats(0, 2), "n": st.integers(1, 2), "user": st.text(max_size=5)},
)


def _model_read(body: dict[str, Any]) -> list[str]:
    """The strings of a chat request that the model reads: every message's text, tool calls included."""
    return [text for message in body.get("messages", []) for text in _strings(message)]


@FUZZ
@given(body=CHAT_BODY)
def test_fuzzed_chat_requests(fuzz_proxy: Proxy, scripted: ScriptedUpstream, body: dict[str, Any]) -> None:
    scripted.received.clear()
    with fuzz_proxy.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code < 500, response.text
    assert "error" in response.json() or response.status_code == 200
    # screened sequentially, no request the model reads unsafe text in may reach it
    for sent in scripted.received:
        assert not _unsafe_in(_model_read(sent)), sent
    if response.status_code == 200:
        assert not _unsafe_in(list(_strings(response.json())))


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_fuzzed_garbage_bodies(fuzz_proxy: Proxy, raw: bytes) -> None:
    with fuzz_proxy.http() as http:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            response = http.post(path, content=raw, headers={"content-type": "application/json"})
            assert response.status_code < 500, response.text
            assert response.json()["error"]["message"]


# -- upstream streams -------------------------------------------------------------------------------------------

_CHAT_CHANNELS = ["content", "reasoning_content", "reasoning", "refusal", "tool_call", "function_call", "audio"]


def _chat_delta(channel: str, text: str) -> dict[str, Any]:
    if channel == "tool_call":
        return {"tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"arguments": text}}]}
    if channel == "function_call":
        return {"function_call": {"arguments": text}}
    if channel == "audio":
        return {"audio": {"id": "a", "transcript": text}}
    return {channel: text}


@st.composite
def _chat_stream(draw: st.DrawFn) -> list[bytes]:
    pieces = draw(st.lists(st.tuples(st.sampled_from(_CHAT_CHANNELS), TEXT), min_size=1, max_size=8))
    events = []
    for channel, text in pieces:
        choice = {"index": 0, "delta": _chat_delta(channel, text), "finish_reason": None}
        if draw(st.booleans()):
            choice["logprobs"] = {"content": [{"token": text, "logprob": -0.1, "top_logprobs": []}]}
        events.append({"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [choice]})
    events.append(
        {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    )
    return _sse(draw, [json.dumps(event) for event in events] + (["[DONE]"] if draw(st.booleans()) else []))


def _sse(draw: st.DrawFn, payloads: list[str]) -> list[bytes]:
    """The events as SSE bytes (LF or CRLF, comments and junk lines mixed in), cut at arbitrary points."""
    end = draw(st.sampled_from(["\n\n", "\r\n\r\n"]))
    extra = draw(st.sampled_from(["", ": keep-alive" + end, "data: not json" + end]))
    raw = (extra + "".join(f"data: {payload}{end}" for payload in payloads)).encode()
    cuts = sorted(set(draw(st.lists(st.integers(0, len(raw)), max_size=6))))
    return [raw[start:stop] for start, stop in zip([0, *cuts], [*cuts, len(raw)], strict=True) if raw[start:stop]]


def _client_texts(raw: str) -> list[str]:
    """Every text a client assembles from a stream: each string of each event, and the deltas of each field
    joined in order (a phrase split over chunks is whole to the reader)."""
    texts: list[str] = []
    joined: dict[str, str] = {}
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        payload = "\n".join(line[5:].strip() for line in block.split("\n") if line.startswith("data:"))
        try:
            data = json.loads(payload)
        except ValueError:
            texts.append(payload)
            continue
        texts += list(_strings(data))
        for choice in data.get("choices") or [] if isinstance(data, dict) else []:
            for name, value in (choice.get("delta") or {}).items():
                joined[name] = joined.get(name, "") + " ".join(_strings(value))
        if isinstance(data, dict) and isinstance(data.get("delta"), str):
            key = f"{data.get('item_id')}:{data.get('content_index')}"
            joined[key] = joined.get(key, "") + data["delta"]
    return texts + list(joined.values())


def _stream_through(proxy: Proxy, path: str, body: dict[str, Any]) -> str:
    with proxy.http() as http, http.stream("POST", path, json=body) as response:
        assert response.status_code < 500
        try:
            return "".join(response.iter_text())
        except httpx.RemoteProtocolError as error:  # a stream must end cleanly, whatever the upstream sent
            raise AssertionError(f"the stream was cut: {error}") from None


@FUZZ
@given(stream=_chat_stream())
def test_fuzzed_chat_streams(fuzz_proxy: Proxy, scripted: ScriptedUpstream, stream: list[bytes]) -> None:
    scripted.stream = stream
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    received = _stream_through(fuzz_proxy, "/v1/chat/completions", body)
    assert not _unsafe_in(_client_texts(received)), received


@st.composite
def _responses_stream(draw: st.DrawFn) -> list[bytes]:
    events: list[dict[str, Any]] = [{"type": "response.created", "response": {"id": "r", "status": "in_progress"}}]
    output = []
    for index, text in enumerate(draw(st.lists(TEXT, min_size=1, max_size=4))):
        item_id = f"msg_{index}"
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"type": "message", "id": item_id, "role": "assistant", "content": [part]}
        where = draw(st.sampled_from(["deltas", "done-only", "item-only", "completed-only"]))
        if where == "deltas":
            events.append(
                {
                    "type": "response.output_text.delta",
                    "item_id": item_id,
                    "output_index": index,
                    "content_index": 0,
                    "delta": text,
                }
            )
        if where in ("deltas", "done-only"):
            events.append(
                {
                    "type": "response.output_text.done",
                    "item_id": item_id,
                    "output_index": index,
                    "content_index": 0,
                    "text": text,
                }
            )
        if where != "completed-only":
            events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        output.append(item)
    events.append({"type": "response.completed", "response": {"id": "r", "status": "completed", "output": output}})
    return _sse(draw, [json.dumps(event) for event in events])


@FUZZ
@given(stream=_responses_stream())
def test_fuzzed_responses_streams(fuzz_proxy: Proxy, scripted: ScriptedUpstream, stream: list[bytes]) -> None:
    scripted.stream = stream
    received = _stream_through(fuzz_proxy, "/v1/responses", {"model": "m", "input": "hi", "stream": True})
    assert not _unsafe_in(_client_texts(received)), received
