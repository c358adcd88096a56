"""The fault matrix of RELIABILITY.md: each way the guard, the upstream and the client can fail, through the real
proxy on loopback (the scripted guard and the fake upstream misbehaving on purpose); the configuration's (rows K1,
K2): test_gate_config_faults.py.

Under `on_guard_error: block` the gate fails closed (a prompt gets 503 guard_unavailable, an answer is withheld, a
stream is cut with a proper ending); under `allow` the request passes and the pass is recorded. Content longer
than the guard's context is judged in segments whatever the policy says. Every error is an OpenAI-shaped JSON
body with the right status, never a plain-text 500."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rsafe_proxy.policy.loading import load_policy
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.sdk import tenant_policy, user, wait_until
from tests.serving import Proxy, Servers, unused_url, write_policy

CHAT = "/v1/chat/completions"
ANSWER = "Echo: hello"


@dataclass(frozen=True)
class Result:
    """What the client received: the status, the headers, the raw text, and the JSON body or SSE events."""

    status: int
    headers: httpx.Headers
    text: str
    events: list[Any]  # the SSE data payloads ('[DONE]' as a string); [] for a JSON reply

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def streamed_text(self) -> str:
        return "".join(
            (choice.get("delta") or {}).get("content") or ""
            for event in self.events
            if isinstance(event, dict)
            for choice in event.get("choices", [])
        )

    @property
    def finish_reasons(self) -> list[str]:
        return [
            choice["finish_reason"]
            for event in self.events
            if isinstance(event, dict)
            for choice in event.get("choices", [])
            if choice.get("finish_reason")
        ]


def data_of(raw: str) -> list[Any]:
    """The data of each SSE event in `raw`, as JSON ('[DONE]' as a string)."""
    items: list[Any] = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        payload = "\n".join(line[5:].strip() for line in block.split("\n") if line.startswith("data:"))
        if payload:
            items.append(payload if payload == "[DONE]" else json.loads(payload))
    return items


def send(proxy: Proxy, stream: bool, text: str = "hello", path: str = CHAT, timeout: float = 10) -> Result:
    """POST a chat completion (or `path`'s body) and read the whole reply."""
    if path == CHAT:
        body: dict[str, Any] = {"model": "fake-model", "messages": user(text)}
    else:
        body = {"model": "fake-model", "input": text}
    if stream:
        body["stream"] = True
    with httpx.Client(base_url=proxy.url, timeout=timeout) as http:
        reply = http.post(path, json=body)
    is_sse = reply.headers.get("content-type", "").startswith("text/event-stream")
    return Result(reply.status_code, reply.headers, reply.text, data_of(reply.text) if is_sse else [])


def assert_error(result: Result, status: int, code: str) -> dict[str, Any]:
    """The reply is an OpenAI-shaped JSON error with this status and code; returns its `error` object."""
    assert result.status == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    error = result.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert error["code"] == code
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    return dict(error)


def assert_error_event(event: Any, code: str) -> None:
    """`event` is the OpenAI-shaped error event a stream ends with."""
    assert isinstance(event, dict) and set(event) == {"error"}
    assert {"message", "type", "code"} <= set(event["error"])
    assert event["error"]["code"] == code and event["error"]["type"] == "server_error"


def decisions(proxy: Proxy, side: str, outcome: str) -> float:
    """How many screening decisions /metrics has counted for `side` with `outcome`."""
    with proxy.http() as http:
        metrics = http.get("/metrics").text
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("rsafe_decisions_total{") and f'side="{side}"' in line and f'outcome="{outcome}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def served_guard(servers: Servers, guard: ScriptedGuard) -> Callable[[], None]:
    """A function that stops the guard's server (later connections are refused)."""
    served = next(running for running in servers.running if running.url == guard.url)
    return served.stop


# -- the guard fails -------------------------------------------------------------------------------------------

GUARD_TIMEOUT_S = 0.5


def _slow(guard: ScriptedGuard) -> None:
    guard.delay_s = 5.0


def _status_5xx(guard: ScriptedGuard) -> None:
    guard.status = 503


def _status_4xx(guard: ScriptedGuard) -> None:
    guard.status = 401  # a bad guard key


def _garbage(guard: ScriptedGuard) -> None:
    guard.garbage = True


def _not_json(guard: ScriptedGuard) -> None:
    guard.raw_body = b"<html><body>502 Bad Gateway</body></html>"


def _truncated(guard: ScriptedGuard) -> None:
    guard.raw_body = (
        b'{"id": "guard-1", "choices": [{"index": 0, "message": {"content": "<think>fine</think> \\\\boxed{sa'
    )


def _reset(guard: ScriptedGuard) -> None:
    guard.breaks_off = True


# "down" is not a knob: the guard's server is stopped (see test_the_guard_fails)
GUARD_FAULTS: dict[str, Callable[[ScriptedGuard], None] | None] = {
    "down": None,
    "slower than its timeout": _slow,
    "HTTP 5xx": _status_5xx,
    "HTTP 4xx": _status_4xx,
    "no readable verdict": _garbage,
    "not JSON": _not_json,
    "truncated JSON": _truncated,
    "reset mid-answer": _reset,
}


@pytest.mark.parametrize("on_guard_error", ["block", "allow"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("fault", GUARD_FAULTS)
def test_the_guard_fails(
    make_proxy: MakeProxy,
    servers: Servers,
    guard: ScriptedGuard,
    upstream: FakeUpstream,
    tmp_path: Path,
    fault: str,
    side: str,
    stream: bool,
    on_guard_error: str,
) -> None:
    policy = write_policy(tmp_path, "p", on_guard_error=on_guard_error)
    proxy = tenant_policy(make_proxy, policy, guard={"timeout_s": GUARD_TIMEOUT_S})
    inject = GUARD_FAULTS[fault]
    if inject is None:
        if side == "output":  # the prompt's verdict is cached while the guard is up; the answer will be new
            upstream.answer = "A first answer, judged while the guard was up."
            assert send(proxy, stream).status == 200
            upstream.answer = None
        served_guard(servers, guard)()
    else:
        guard.only_side = side
        inject(guard)

    started = time.monotonic()
    result = send(proxy, stream)
    assert time.monotonic() - started < GUARD_TIMEOUT_S + 3  # a slow guard is given up on, not waited for
    assert "Traceback" not in result.text

    if on_guard_error == "allow":  # the request passes, and the pass is recorded
        assert result.status == 200
        assert (result.streamed_text if stream else result.json()["choices"][0]["message"]["content"]) == ANSWER
        assert decisions(proxy, side, "guard_error_allow") >= 1
        assert result.headers["x-rsafe-input"] == ("guard_error_allow" if side == "input" else "allow")
        return
    message = load_policy(policy).messages.guard_error
    if side == "input" or not stream:  # fail closed: no answer at all
        error = assert_error(result, 503, "guard_unavailable")
        assert error["message"] == message
        assert ANSWER not in result.text
    else:  # the stream is cut with the policy's message and a proper ending, the answer withheld
        assert result.status == 200
        assert ANSWER not in result.text
        assert result.streamed_text == message
        assert result.finish_reasons == ["content_filter"]
        assert result.events[-1] == "[DONE]"
    assert decisions(proxy, side, "guard_error_block") >= 1


def filler(length: int) -> str:
    words = ("alpha", "bravo", "charlie", "delta", "echo")
    return " ".join(words[n % 5] for n in range(length // 6 + 1))[:length]


@pytest.mark.parametrize("on_guard_error", ["block", "allow"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_content_longer_than_the_guard_s_context_is_judged_in_segments(
    make_proxy: MakeProxy,
    guard: ScriptedGuard,
    upstream: FakeUpstream,
    tmp_path: Path,
    side: str,
    stream: bool,
    on_guard_error: str,
) -> None:
    """The guard server refuses a prompt past its context (a 400, as vLLM words it). That is no guard error: the
    content is judged in pieces that fit, all of them, and an unsafe piece anywhere blocks, under `allow` too."""
    guard.context_chars = 4000
    # buffer mode judges a streamed answer whole at its end: the longest output screen there is
    policy = write_policy(tmp_path, "p", on_guard_error=on_guard_error, stream={"mode": "buffer"})
    proxy = tenant_policy(make_proxy, policy)
    unsafe = filler(10_000) + f" {UNSAFE} " + filler(10_000)
    if side == "input":
        assert_error(send(proxy, stream, unsafe), 400, "content_filter")
        safe = send(proxy, stream, filler(20_000))
        assert safe.status == 200 and safe.headers["x-rsafe-input"] == "allow"
    else:
        upstream.answer = unsafe
        result = send(proxy, stream)
        assert result.status == 200 and UNSAFE not in result.text
        if stream:
            assert result.finish_reasons == ["content_filter"] and result.events[-1] == "[DONE]"
            assert result.streamed_text == load_policy(policy).messages.block.output
        else:
            assert result.json()["choices"][0]["finish_reason"] == "content_filter"
    judged = guard.judged(side)
    assert len(judged) > 5  # in pieces
    assert all(len(call.prompt) <= 4000 for call in guard.calls)
    assert any(UNSAFE in text for text in judged)  # the piece in the middle was judged, not skipped
    assert decisions(proxy, side, "guard_error_allow") == decisions(proxy, side, "guard_error_block") == 0


# -- the upstream fails ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_upstream_that_refuses_connections_is_502(make_proxy: MakeProxy, stream: bool) -> None:
    proxy = make_proxy(upstream={"base_url": f"{unused_url()}/v1"})
    assert_error(send(proxy, stream), 502, "upstream_unavailable")


@pytest.mark.parametrize("screening", ["parallel", "sequential"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_upstream_with_no_first_byte_before_its_timeout_is_504(
    make_proxy: MakeProxy, upstream: FakeUpstream, stream: bool, screening: str
) -> None:
    proxy = make_proxy(upstream={"timeout_s": 0.5}, server={"input_screening": screening})
    upstream.first_byte_delay_s = 5.0
    started = time.monotonic()
    assert_error(send(proxy, stream), 504, "upstream_timeout")
    assert time.monotonic() - started < 3
    assert upstream.aborted.wait(3)  # the proxy hung up on it


@pytest.mark.parametrize("status", [500, 502, 503])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_upstream_5xx_is_passed_through_with_its_body(
    proxy: Proxy, upstream: FakeUpstream, status: int, stream: bool
) -> None:
    body = {"error": {"message": "the model is overloaded", "type": "server_error", "param": None, "code": None}}
    upstream.fail = (status, body)
    result = send(proxy, stream)
    assert result.status == status
    assert result.json() == body
    assert result.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    "raw",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"id": "cmpl-1", "choices": [{"index": 0, "message": {"content": "Sure. Step one',
        b'{"id": "cmpl-1", "object": "chat.completion"}',
        b'["a", "list"]',
        b"",
    ],
    ids=["html", "truncated", "no choices", "not an object", "empty"],
)
def test_an_upstream_answer_that_is_not_an_answer_is_502(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard, raw: bytes
) -> None:
    upstream.raw_answer = raw
    result = send(proxy, stream=False)
    assert_error(result, 502, "upstream_unavailable")
    assert "Step one" not in result.text
    assert guard.judged("output") == []


def test_an_upstream_stream_that_is_garbage_ends_with_an_error_event(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.script = [b"<html><body>502 Bad Gateway</body></html>"]
    result = send(proxy, stream=True)
    assert result.status == 200 and "Bad Gateway" not in result.text
    assert_error_event(result.events[-1], "upstream_unavailable")


def _chat_chunk(content: str) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": None}
    event = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    return f"data: {json.dumps(event)}\n\n".encode()


@pytest.mark.parametrize("mode", ["chunked", "buffer", "async"])
@pytest.mark.parametrize("breaks", [True, False], ids=["broken", "stalled"])
def test_an_upstream_stream_that_fails_midway_delivers_the_judged_text_then_an_error(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, mode: str, breaks: bool
) -> None:
    proxy = tenant_policy(
        make_proxy, write_policy(tmp_path, f"s-{mode}", stream={"mode": mode}), upstream={"timeout_s": 0.5}
    )
    upstream.script = [_chat_chunk("Hello "), _chat_chunk("world")]
    if breaks:
        upstream.script_breaks = True
    else:
        upstream.script.append(3.0)  # then nothing, past the upstream's read timeout
    result = send(proxy, stream=True)
    assert result.status == 200
    assert result.streamed_text == "Hello world"
    assert "Hello world" in guard.judged("output")  # delivered because it was judged
    assert_error_event(result.events[-1], "upstream_unavailable" if breaks else "upstream_timeout")


@pytest.mark.parametrize("breaks", [True, False], ids=["broken", "stalled"])
def test_a_responses_stream_that_fails_midway_ends_with_response_failed(
    make_proxy: MakeProxy, upstream: FakeUpstream, breaks: bool
) -> None:
    proxy = make_proxy(upstream={"timeout_s": 0.5})
    position = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {"id": "resp_1", "object": "response", "status": "in_progress"}},
        {"type": "response.output_text.delta", **position, "delta": "Hello "},
        {"type": "response.output_text.delta", **position, "delta": "world"},
    ]
    script: list[bytes | float] = [
        f"event: {event['type']}\ndata: {json.dumps({**event, 'sequence_number': n})}\n\n".encode()
        for n, event in enumerate(events)
    ]
    upstream.script = script if breaks else [*script, 3.0]
    upstream.script_breaks = breaks
    result = send(proxy, stream=True, path="/v1/responses")
    assert result.status == 200
    deltas = [e["delta"] for e in result.events if e.get("type") == "response.output_text.delta"]
    assert "".join(deltas) == "Hello world"
    final = result.events[-1]
    assert final["type"] == "response.failed"
    assert final["response"]["status"] == "failed"
    assert final["response"]["error"]["code"] == ("upstream_unavailable" if breaks else "upstream_timeout")


# -- the client misbehaves -------------------------------------------------------------------------------------


@pytest.mark.parametrize("screening", ["parallel", "sequential"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_that_leaves_mid_screening_cancels_the_guard_and_the_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, stream: bool, screening: str
) -> None:
    proxy = make_proxy(server={"input_screening": screening}, guard={"timeout_s": 10})
    guard.delay_s = 5.0
    upstream.first_byte_delay_s = 5.0
    with pytest.raises(httpx.ReadTimeout):
        send(proxy, stream, timeout=0.3)
    assert wait_until(lambda: guard.cancelled == 1, 3)
    if screening == "parallel":
        assert upstream.aborted.wait(3)
    else:  # the upstream is never called before the verdict
        time.sleep(0.2)
        assert upstream.calls(CHAT) == []
    assert upstream.completed == 0


def _connect(proxy: Proxy) -> socket.socket:
    host, port = proxy.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_after(sock: socket.socket, opened: float, trickle: bytes | None, limit_s: float) -> tuple[float, bytes]:
    """Wait until the server closes `sock` (sending `trickle` every 0.1 s meanwhile); when, and what it sent."""
    data = b""
    deadline = opened + limit_s
    while time.monotonic() < deadline:
        if select.select([sock], [], [], 0.1)[0]:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                part = b""
            if not part:
                return time.monotonic() - opened, data
            data += part
        elif trickle is not None:
            try:
                sock.sendall(trickle)
            except OSError:
                return time.monotonic() - opened, data
    return float("inf"), data


def test_idle_and_slowloris_connections_are_closed_while_a_real_request_is_served(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(server={"header_timeout_s": 1.0})
    idle = [_connect(proxy) for _ in range(40)]
    slow = [_connect(proxy) for _ in range(10)]
    opened = time.monotonic()
    for sock in slow:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\n")
    outcomes: dict[int, tuple[float, bytes]] = {}

    def watch(index: int, sock: socket.socket, trickle: bytes | None) -> None:
        outcomes[index] = _closed_after(sock, opened, trickle, 6)

    watchers = [
        threading.Thread(target=watch, args=(n, sock, None if n < len(idle) else b"x-slow: 1\r\n"))
        for n, sock in enumerate(idle + slow)
    ]
    for watcher in watchers:
        watcher.start()
    try:
        with proxy.client(max_retries=0) as client:  # served beside them, streamed and not
            answer = client.chat.completions.create(model="fake-model", messages=user("hello"))
            with client.chat.completions.create(model="fake-model", messages=user("hi"), stream=True) as chunks:
                streamed = "".join(choice.delta.content or "" for c in chunks for choice in c.choices)
        assert answer.choices[0].message.content == ANSWER
        assert streamed == "Echo: hi"
        for watcher in watchers:
            watcher.join(10)
    finally:
        for sock in idle + slow:
            sock.close()
    for index in range(len(idle)):
        seconds, data = outcomes[index]
        assert 0.8 <= seconds < 4 and data == b""  # closed at the header timeout, nothing said
    for index in range(len(idle), len(idle) + len(slow)):
        seconds, data = outcomes[index]
        assert seconds < 4  # the bytes that kept coming did not extend the deadline
        assert data.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in data.replace(b" ", b"")
