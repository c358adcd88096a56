"""Availability of the proxy's own HTTP server: head and body timeouts, the connection cap, the catch-all error
boundary, malformed bodies and the server limits' defaults (graceful shutdown: test_gate_shutdown.py; the guard's
pool: test_gate_guard_pool.py). Every test runs the proxy as `rsafe-proxy serve` runs it (rsafe_proxy.server),
on loopback, with raw sockets or httpx."""

from __future__ import annotations

import json
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rsafe_proxy.config import Settings
from rsafe_proxy.middleware import BodyLimit, ErrorBoundary
from rsafe_proxy.server import connection_cap
from tests.conftest import MakeProxy
from tests.doubles import ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy, serve

# -- raw HTTP on a socket --------------------------------------------------------------------------------------


def _connect(proxy: Proxy) -> socket.socket:
    host, port = proxy.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (monotonic)."""
    sock.settimeout(seconds)
    data = b""
    while True:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            part = b""
        if not part:
            return data, time.monotonic()
        data += part


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body), however the server's writes were split."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head = raw.partition(b"\r\n\r\n")[0].decode().lower()
    length = int(head.split("content-length: ", 1)[1].split("\r\n", 1)[0])
    while len(raw.partition(b"\r\n\r\n")[2]) < length:
        raw += sock.recv(65536)
    return raw


def _status_and_json(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body[: int(headers["content-length"])])


def _trickle(sock: socket.socket, pieces: Iterator[bytes], gap_s: float, until_s: float) -> bytes:
    """Send `pieces` `gap_s` apart until the server answers (or `until_s` passes); what it sent till it closed."""
    deadline = time.monotonic() + until_s
    for piece in pieces:
        readable, _, _ = select.select([sock], [], [], gap_s)
        if readable or time.monotonic() > deadline:
            break
        try:
            sock.sendall(piece)
        except OSError:  # the server closed while the client was still sending
            break
    return _read_until_closed(sock, 5)[0]


def _forever(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


# -- the request head ------------------------------------------------------------------------------------------


def test_a_silent_connection_is_closed_after_the_header_timeout(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(server={"header_timeout_s": 0.5})
    with closing(_connect(proxy)) as sock:
        opened = time.monotonic()
        data, closed = _read_until_closed(sock, 5)
    assert data == b""  # nothing was asked, nothing is answered
    assert 0.4 <= closed - opened < 3


def test_a_trickled_request_head_gets_408_at_the_header_timeout(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(server={"header_timeout_s": 0.6})
    with closing(_connect(proxy)) as sock:
        opened = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\n")
        raw = _trickle(sock, _forever(b"x-slow: 1\r\n"), gap_s=0.1, until_s=5)  # each header byte in time
        closed = time.monotonic()
    status, headers, body = _status_and_json(raw)
    assert status == 408
    assert headers["connection"] == "close"
    assert body["error"]["code"] == "request_timeout"
    assert closed - opened < 3  # the bytes that kept coming did not extend the deadline


def test_the_head_of_a_second_request_is_timed_too(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(server={"header_timeout_s": 0.6, "keep_alive_timeout_s": 30})
    with closing(_connect(proxy)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: proxy\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a head on the kept-alive connection
        raw = _trickle(sock, _forever(b"x-slow: 1\r\n"), gap_s=0.1, until_s=5)
        closed = time.monotonic()
    assert raw.startswith(b"HTTP/1.1 408")
    assert closed - started < 3  # well before the 30 s keep-alive timeout


def test_an_idle_kept_alive_connection_is_closed(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(server={"keep_alive_timeout_s": 1, "header_timeout_s": 30})
    with closing(_connect(proxy)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: proxy\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        data, closed = _read_until_closed(sock, 10)
    assert data == b""
    assert 0.8 <= closed - answered < 4


def test_a_malformed_request_gets_a_json_400(proxy: Proxy) -> None:
    with closing(_connect(proxy)) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        raw, _ = _read_until_closed(sock, 5)
    status, headers, body = _status_and_json(raw)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert body["error"]["type"] == "invalid_request_error"


def test_a_head_over_the_cap_gets_a_json_431_whole_or_trickled(proxy: Proxy) -> None:
    # llhttp keeps a header it has not seen the end of in memory: a head that never ends must not grow for good
    big = b"GET /healthz HTTP/1.1\r\nhost: proxy\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n"
    with closing(_connect(proxy)) as sock:
        sock.sendall(big)
        raw, _ = _read_until_closed(sock, 5)
    status, headers, body = _status_and_json(raw)
    assert (status, headers["connection"]) == (431, "close")
    assert body["error"]["code"] == "request_header_fields_too_large"
    with closing(_connect(proxy)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: proxy\r\nx-endless: ")
        raw = _trickle(sock, _forever(b"a" * 8192), gap_s=0.01, until_s=5)
    assert raw.startswith(b"HTTP/1.1 431")


def test_an_upgrade_request_is_served_as_a_plain_one_then_its_connection_closes(proxy: Proxy) -> None:
    # an h2c upgrade (curl --http2, Java's HttpClient) is not taken up: the request is answered over HTTP/1.1
    with closing(_connect(proxy)) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nhost: proxy\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
            b"http2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        )
        raw, _ = _read_until_closed(sock, 5)
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in raw.lower()


def test_an_upgrade_request_with_a_body_is_refused_not_served_without_it(proxy: Proxy, guard: ScriptedGuard) -> None:
    # llhttp takes the bytes after an Upgrade request's head for the new protocol: the body would be lost
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    with closing(_connect(proxy)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\nconnection: upgrade\r\nupgrade: h2c\r\n"
            b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        raw, _ = _read_until_closed(sock, 5)
    status, _, answer = _status_and_json(raw)
    assert status == 400 and "Upgrade" in answer["error"]["message"]
    assert guard.calls == []


@pytest.mark.parametrize(
    "head",
    [
        b"content-length: 4\r\ntransfer-encoding: chunked",  # which one frames the body? neither is taken
        b"transfer-encoding: chunked\r\ncontent-length: 4",
        b"content-length: 4\r\ncontent-length: 40",
        b"transfer-encoding: gzip, chunked\r\ntransfer-encoding: identity",
        b"content-length: 4\r\n x-folded: continued",  # obs-fold
        b"content-length : 4",  # whitespace before the colon
        b"content-length: +4",
    ],
)
def test_a_head_that_frames_its_body_two_ways_is_refused_before_anyone_reads_it(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard, head: bytes
) -> None:
    # request smuggling: a front proxy and this one must never disagree on where a request ends
    smuggled = b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\n" + b"GET /v1/models HTTP/1.1\r\n\r\n"
    with closing(_connect(proxy)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\n" + head + b"\r\n\r\n0\r\n\r\n" + smuggled)
        raw, _ = _read_until_closed(sock, 5)
    status, headers, body = _status_and_json(raw)
    assert (status, headers["connection"], body["error"]["code"]) == (400, "close", "invalid_request")
    assert raw.count(b"HTTP/1.1 ") == 1  # nothing after the refusal was read as a request
    assert upstream.calls() == [] and guard.calls == []


# -- the request body ------------------------------------------------------------------------------------------


def _body_head(length: int, path: str = "/v1/chat/completions") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\ncontent-length: {length}"
    return head.encode() + b"\r\n\r\n"


def test_a_body_sent_a_byte_at_a_time_gets_408(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    proxy = make_proxy(server={"body_idle_timeout_s": 0.5, "body_timeout_s": 1.0})
    with closing(_connect(proxy)) as sock:
        sock.sendall(_body_head(10_000))
        started = time.monotonic()
        raw = _trickle(sock, _forever(b" "), gap_s=0.1, until_s=5)  # never idle for 0.5 s, never done
        answered = time.monotonic()
    status, headers, body = _status_and_json(raw)
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert headers["connection"] == "close"
    assert 0.9 <= answered - started < 3
    assert upstream.calls() == []


def test_a_body_that_stops_gets_408_after_the_idle_timeout(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(server={"body_idle_timeout_s": 0.5, "body_timeout_s": 30})
    with closing(_connect(proxy)) as sock:
        sock.sendall(_body_head(100) + b'{"model": ')
        started = time.monotonic()
        raw, closed = _read_until_closed(sock, 5)
    assert _status_and_json(raw)[0] == 408
    assert 0.4 <= closed - started < 3


def test_an_oversized_body_that_trickles_gets_413_without_waiting_for_it(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(server={"body_idle_timeout_s": 0.5, "body_timeout_s": 1.0})
    with closing(_connect(proxy)) as sock:
        sock.sendall(_body_head(10_000_000))  # declared too large: the proxy drains it, but not for ever
        raw = _trickle(sock, _forever(b" "), gap_s=0.1, until_s=5)
    status, _, body = _status_and_json(raw)
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"


def test_a_body_nobody_reads_cannot_hold_the_connection(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(server={"keep_alive_timeout_s": 1, "header_timeout_s": 30, "body_timeout_s": 30})
    with closing(_connect(proxy)) as sock:
        sock.sendall(_body_head(50_000, path="/not-a-route"))  # answered 404 without reading the body
        started = time.monotonic()
        assert _read_response(sock).startswith(b"HTTP/1.1 404")
        closed_early = False
        while time.monotonic() - started < 5:  # the client goes on sending the body, a byte at a time
            try:
                sock.sendall(b" ")
            except OSError:
                closed_early = True
                break
            if select.select([sock], [], [], 0.1)[0] and sock.recv(1) == b"":
                closed_early = True
                break
    assert closed_early
    assert time.monotonic() - started < 4


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": '
            + b'{"a": ' * 50_000
            + b"1"
            + b"}" * 50_000
            + b"}",
            "nested too deeply",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1' + b"0" * 5000 + b"}", "digit"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    ],
    ids=["deep-array", "deep-object", "huge-integer", "lone-surrogate"],
)
def test_bodies_that_crash_a_parser_are_400(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, content: bytes, needle: str
) -> None:
    proxy = make_proxy(server={"max_body_bytes": 1024 * 1024})
    with proxy.http() as http:
        response = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]
    assert upstream.calls() == []
    assert guard.calls == []


def test_an_oversized_body_streamed_to_a_pass_through_route_is_413(proxy: Proxy, upstream: FakeUpstream) -> None:
    def chunks() -> Iterator[bytes]:  # no content-length: the limit is found while reading (BodyLimit.limited)
        yield b'{"model": "fake-embed", "input": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}'

    with proxy.http() as http:
        response = http.post("/v1/embeddings", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert upstream.calls() == []


# -- connections -----------------------------------------------------------------------------------------------


def test_connections_past_the_cap_get_a_json_503(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(server={"max_connections": 3, "header_timeout_s": 30})
    idle = [_connect(proxy) for _ in range(2)]
    try:
        time.sleep(0.2)  # the server has accepted them
        with proxy.http() as http:
            assert http.get("/healthz").status_code == 200  # 2 idle + this one: at the cap, served
        idle.append(_connect(proxy))
        time.sleep(0.2)
        with proxy.http() as http:
            refused = http.get("/healthz")
        assert refused.status_code == 503
        assert refused.headers["connection"] == "close"
        assert refused.json()["error"] == {
            "message": "The proxy has too many open connections; retry shortly.",
            "type": "server_error",
            "param": None,
            "code": "server_overloaded",
        }
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    with proxy.http() as http:
        assert http.get("/healthz").status_code == 200


def test_the_cap_leaves_descriptors_for_the_upstream_and_guard_pools() -> None:
    settings = Settings.model_validate(
        {"server": {"max_connections": 4096}, "upstream": {"max_connections": 200}, "guard": {"max_connections": 64}}
    )
    assert connection_cap(settings, 1 << 20) == 4096
    assert connection_cap(settings, 1024) == 1024 - 200 - 64 - 64


def test_serving_raises_the_open_file_limit_to_the_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 64:
        pytest.skip("the hard open-file limit is too low to lower the soft one")
    script = (
        "import resource\n"
        "from rsafe_proxy.server import raise_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))\n"
        "print(raise_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    returned, now = (int(value) for value in done.stdout.split())
    assert returned == now
    assert now > 32
    assert now == hard or hard == resource.RLIM_INFINITY


# -- the catch-all ---------------------------------------------------------------------------------------------


async def _fails(request: Request) -> Response:
    raise RuntimeError("secret internals: /etc/rsafe/key at 0xdeadbeef")


async def _reads_the_body(request: Request) -> Response:  # reads the body with no error handling of its own
    return JSONResponse({"size": len(await request.body())})


class _StartsThenFails:
    """A response that starts, then fails: its status is sent, so the connection can only be closed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/half":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
            raise RuntimeError("failed after the headers")
        await self.app(scope, receive, send)


def _bounded_app() -> Starlette:
    """A minimal app behind the proxy's own error boundary and body limit, as build_app stacks them."""
    return Starlette(
        routes=[Route("/fails", _fails), Route("/body", _reads_the_body, methods=["POST"])],
        middleware=[Middleware(ErrorBoundary), Middleware(_StartsThenFails), Middleware(BodyLimit, max_bytes=1024)],
    )


def test_an_unexpected_exception_is_a_json_500_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    with serve(_bounded_app(), lifespan="off") as served, httpx.Client(base_url=served.url) as http:
        response = http.get("/fails")
        again = http.get("/fails")  # the connection is still usable
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert error["code"] == "internal_error"
    assert "secret" not in response.text
    assert "RuntimeError" not in response.text
    assert again.status_code == 500
    traced = [record for record in caplog.records if record.name == "rsafe_proxy" and record.exc_info]
    assert traced
    assert "secret internals" in str(traced[0].exc_info[1] if traced[0].exc_info else "")


def test_a_proxy_error_raised_by_a_middleware_keeps_its_status() -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"z" * 512

    with serve(_bounded_app(), lifespan="off") as served, httpx.Client(base_url=served.url) as http:
        response = http.post("/body", content=chunks())  # raised from BodyLimit's receive, in no try block
        small = http.post("/body", content=b"z" * 10)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert small.json() == {"size": 10}


def test_a_response_that_fails_after_it_started_is_cut_not_replaced() -> None:
    with serve(_bounded_app(), lifespan="off") as served, httpx.Client(base_url=served.url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            http.get("/half")  # a status already sent cannot become a 500: the client sees the cut
        assert http.get("/fails").status_code == 500


# -- server limits' defaults -----------------------------------------------------------------------------------


def test_the_server_limits_have_safe_documented_defaults() -> None:
    server = Settings().server
    assert (server.header_timeout_s, server.keep_alive_timeout_s) == (10.0, 20)
    assert (server.body_idle_timeout_s, server.body_timeout_s) == (15.0, 120.0)
    assert (server.max_connections, server.shutdown_grace_s) == (4096, 30.0)
    schema = Settings.model_json_schema()["$defs"]["ServerSettings"]["properties"]
    for name in ("header_timeout_s", "keep_alive_timeout_s", "body_idle_timeout_s", "body_timeout_s"):
        assert schema[name]["description"]
    assert schema["max_connections"]["description"] and schema["shutdown_grace_s"]["description"]
    with pytest.raises(ValueError):
        Settings.model_validate({"server": {"header_timeout_s": 0}})
