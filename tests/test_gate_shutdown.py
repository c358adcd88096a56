"""Graceful shutdown of the proxy's own HTTP server: streams under way end cleanly at the grace period (a chat
stream with [DONE], a responses stream with response.failed, an API error to the SDK), a stream that ends within
it is complete, a request still unanswered gets a JSON 503, and SIGTERM to `rsafe-proxy serve` does the same. On
loopback, as `rsafe-proxy serve` runs the proxy; then the ending itself (draining.until_drained and the windowed
screen's stop event), without a server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import yaml

from rsafe_proxy.apis import RESPONSES
from rsafe_proxy.draining import SHUTDOWN_MESSAGE, Drain, until_drained
from rsafe_proxy.errors import ServerShuttingDown
from rsafe_proxy.policy.schema import StreamSettings
from rsafe_proxy.streaming import WindowedScreen, sse_events
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy, proxy_config, unused_url, write_policy
from tests.test_stream_windows import SENTENCES, GatedJudge, until

LONG_ANSWER = " ".join(f"word{number}" for number in range(60))


def _small_windows(make_proxy: MakeProxy, directory: Path, **server: Any) -> Proxy:
    """A proxy whose policy releases a streamed answer every few words (so a stream is under way when cut)."""
    policy = write_policy(directory, "small-windows", stream={"window_chars": 40, "overlap_chars": 8})
    tenants = [{"id": "default", "anonymous": True, "policy": str(policy)}]
    return make_proxy(server=server, tenants=tenants)


def _events(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


@contextmanager
def _reading_stream(url: str, path: str, body: dict[str, Any]) -> Iterator[tuple[list[str], threading.Event]]:
    """Stream `body` to `path` in a thread, collecting the lines read; the event is set at the first data line.
    At the end of the block the stream has been read to its end (an error while reading fails the test)."""
    lines: list[str] = []
    first = threading.Event()
    failures: list[BaseException] = []

    def read() -> None:
        try:
            with (
                httpx.Client(base_url=url, timeout=30) as http,
                http.stream("POST", path, json=body) as response,
            ):
                assert response.status_code == 200
                for line in response.iter_lines():
                    lines.append(line)
                    if line.startswith("data: "):
                        first.set()
        except BaseException as error:
            failures.append(error)
        finally:
            first.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        yield lines, first
    finally:
        reader.join(timeout=30)
    assert not reader.is_alive()
    assert not failures, failures


def test_shutdown_ends_a_long_chat_stream_cleanly_at_the_grace_period(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.answer, upstream.token_delay_s = LONG_ANSWER, 0.2  # 12 s of answer
    proxy = _small_windows(make_proxy, tmp_path, shutdown_grace_s=1)
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "stream": True}
    with _reading_stream(proxy.url, "/v1/chat/completions", body) as (lines, first):
        assert first.wait(10)
        signalled = time.monotonic()
        proxy.served.signal()
    ended = time.monotonic()
    events = _events(lines)
    last = json.loads(events[-1])
    assert last["error"]["code"] == "server_shutting_down"
    assert last["error"]["type"] == "server_error"
    assert "[DONE]" not in events
    assert 0.8 <= ended - signalled < 4
    assert upstream.aborted.wait(5)  # the upstream read was cancelled, not left running


def test_shutdown_ends_a_responses_stream_with_response_failed(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.answer, upstream.token_delay_s = LONG_ANSWER, 0.2
    proxy = _small_windows(make_proxy, tmp_path, shutdown_grace_s=1)
    body = {"model": "fake-model", "input": "hello", "stream": True}
    with _reading_stream(proxy.url, "/v1/responses", body) as (lines, first):
        assert first.wait(10)
        proxy.served.signal()
    events = [json.loads(data) for data in _events(lines)]
    assert events[0]["type"] == "response.created"
    failed = events[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["id"] == events[0]["response"]["id"]  # SDKs check the response's identity
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "server_shutting_down"
    assert failed["sequence_number"] > events[-2]["sequence_number"]
    assert "event: response.failed" in lines


def test_the_sdk_sees_a_shutdown_as_an_api_error_not_a_broken_connection(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.answer, upstream.token_delay_s = LONG_ANSWER, 0.2
    proxy = _small_windows(make_proxy, tmp_path, shutdown_grace_s=0.5)
    with proxy.client(max_retries=0) as client:
        stream = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        with stream, pytest.raises(openai.APIError) as caught:
            for number, _ in enumerate(stream):
                if number == 0:
                    proxy.served.signal()
    assert not isinstance(caught.value, openai.APIConnectionError)
    assert "shutting down" in caught.value.message


def test_a_stream_that_ends_within_the_grace_period_is_complete(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.answer, upstream.token_delay_s = "one two three four five six", 0.1
    proxy = make_proxy(server={"shutdown_grace_s": 5})
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "stream": True}
    with _reading_stream(proxy.url, "/v1/chat/completions", body) as (lines, first):
        assert first.wait(10)
        proxy.served.signal()
    events = _events(lines)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e[0] == "{")
    assert text == "one two three four five six"


def test_a_request_unanswered_at_the_end_of_the_grace_period_gets_a_json_503(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    upstream.first_byte_delay_s = 10
    proxy = make_proxy(server={"shutdown_grace_s": 0.5})
    answers: list[httpx.Response] = []

    def ask() -> None:
        with httpx.Client(base_url=proxy.url, timeout=30) as http:
            body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
            answers.append(http.post("/v1/chat/completions", json=body))

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.5)  # the request is waiting for the upstream
    proxy.served.signal()
    asker.join(timeout=10)
    [answer] = answers
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == ServerShuttingDown.code
    assert upstream.aborted.wait(5)


def test_sigterm_to_rsafe_proxy_serve_ends_streams_cleanly(
    upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> None:
    upstream.answer, upstream.token_delay_s = LONG_ANSWER, 0.2
    policy = write_policy(tmp_path, "small-windows", stream={"window_chars": 40, "overlap_chars": 8})
    tenants = [{"id": "default", "anonymous": True, "policy": str(policy)}]
    config = proxy_config(upstream.url, guard.url, tmp_path, server={"shutdown_grace_s": 1}, tenants=tenants)
    (tmp_path / "proxy.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    url = unused_url()
    port = url.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "rsafe_proxy.cli", "--config", str(tmp_path / "proxy.yaml"), "serve"]
    process = subprocess.Popen(
        [*command, "--port", port, "--log-level", "warning"], env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "rsafe-proxy serve did not start"
            time.sleep(0.1)
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "stream": True}
        with _reading_stream(url, "/v1/chat/completions", body) as (lines, first):
            assert first.wait(10)
            process.send_signal(signal.SIGTERM)
        assert json.loads(_events(lines)[-1])["error"]["code"] == "server_shutting_down"
        # after its graceful shutdown uvicorn re-raises the signal it caught, so the exit status says SIGTERM
        assert process.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- the ending itself, without a server ---------------------------------------------------------------------------


async def _stalled(first: bytes) -> AsyncIterator[bytes]:
    yield first
    await asyncio.Event().wait()  # an upstream that sends no more


async def _drained(first: bytes, ending: Callable[[str], bytes | None] | None) -> bytes:
    drain = Drain()
    out = until_drained(_stalled(first), drain, ending)
    sent = [await anext(out)]
    drain.begin(0.05)
    sent += [chunk async for chunk in out]
    return b"".join(sent)


@pytest.mark.anyio
async def test_a_drained_stream_ends_with_the_streams_own_ending_else_the_generic_error() -> None:
    own = b'event: response.failed\ndata: {"type": "response.failed"}\n\n'
    assert await _drained(b"data: {}\n\n", lambda message: own) == b"data: {}\n\n" + own
    generic = await _drained(b"data: {}\n\n", lambda message: None)  # nothing of its answer went out yet
    assert (
        json.loads(generic.removeprefix(b"data: {}\n\ndata: "))["error"]
        == ServerShuttingDown(SHUTDOWN_MESSAGE).body()["error"]
    )
    half = await _drained(b'data: {"a":', None)  # an event the stream had not finished is closed first
    assert half.startswith(b'data: {"a":\n\ndata: {"error": ')


def _named(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


@pytest.mark.anyio
async def test_a_shutdown_ends_a_stream_as_its_dialect_fails_one_from_what_was_released() -> None:
    judge = GatedJudge()
    response = {"id": "r1", "object": "response", "status": "in_progress", "output": []}
    delta = {"type": "response.output_text.delta", "item_id": "m1", "output_index": 0, "content_index": 0}
    events = [
        {"type": "response.created", "response": response, "sequence_number": 0},
        {**delta, "delta": SENTENCES[0], "sequence_number": 1},  # closes the first window
        {"type": "response.in_progress", "response": {**response, "note": UNSAFE}, "sequence_number": 2},
    ]
    stalled = asyncio.Event()

    async def upstream() -> AsyncIterator[bytes]:  # three events, then nothing more: the shutdown comes first
        for event in events:
            yield _named(event)
        stalled.set()
        await asyncio.Event().wait()

    screen = WindowedScreen(RESPONSES, StreamSettings(first_window_chars=16), judge, decision_id="d" * 32)
    out = screen.run(sse_events(upstream()))
    first = asyncio.ensure_future(anext(out))
    await until(lambda: stalled.is_set() and len(judge.gates) == 1)
    assert screen.stop_event("Stopping.") is None  # nothing went out yet: the generic error event ends it
    judge.open(0)
    assert await first == _named(events[0]) + _named(events[1])
    ending = screen.stop_event("Stopping.")
    assert ending is not None and UNSAFE not in ending.decode()  # the held event's response is never shown
    assert ending.startswith(b"event: response.failed\ndata: ") and ending.endswith(b"\n\n")
    failed = json.loads(ending.removeprefix(b"event: response.failed\ndata: "))
    assert failed["response"]["id"] == "r1" and failed["response"]["status"] == "failed"
    error = {"code": "server_shutting_down", "message": "Stopping.", "decision_id": "d" * 32}
    assert failed["response"]["error"] == error
    assert failed["sequence_number"] == 3
    await cast(AsyncGenerator[bytes, None], out).aclose()  # run() is an async generator
