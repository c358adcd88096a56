"""Pipelined requests on one connection (HTTP/1.1): the server parses a bounded number ahead of the one being
answered, a client that leaves stops every request it had sent, a refusal never lands inside an answer being
written, and timers and caps count per request, not per read. Raw sockets against `rsafe-proxy serve`'s server
(rsafe_proxy.server) on loopback."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from contextlib import closing

import pytest

from tests.conftest import MakeProxy
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy


def _connect(proxy: Proxy) -> socket.socket:
    host, port = proxy.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _until_closed(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    data = b""
    while True:
        try:
            part = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not part:
            return data
        data += part


_CHAT_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\ncontent-type: application/json\r\ncontent-length: "


def _streamed_chat(text: str) -> bytes:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}], "stream": True}).encode()
    return _CHAT_HEAD + str(len(body)).encode() + b"\r\n\r\n" + body


def test_pipelined_requests_are_parsed_only_a_few_ahead(proxy: Proxy) -> None:
    # small requests, 512 to a write, sent as fast as the connection takes them while the answers are read:
    # parsing every request of every read would queue tens of thousands of them (about 2.5 KB each) in memory
    head = b"GET /healthz HTTP/1.1\r\nhost:a\r\nx:"
    request = head + b"y" * (64 - len(head) - 4) + b"\r\n\r\n"
    blob = request * 512
    connections = proxy.served.server.server_state.connections
    with closing(_connect(proxy)) as sock:
        stop = threading.Event()

        def read_answers() -> None:
            sock.settimeout(0.5)
            while not stop.is_set():
                try:
                    if not sock.recv(1 << 20):
                        return
                except TimeoutError:
                    continue
                except OSError:
                    return

        reader = threading.Thread(target=read_answers, daemon=True)
        reader.start()
        most = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                sock.sendall(blob)
            except OSError:
                break
            time.sleep(0.001)
            most = max(most, sum(len(getattr(c, "pipeline", ())) for c in list(connections)))
        stop.set()
        reader.join(5)
    assert most <= 16


def test_pipelined_requests_within_the_bound_are_all_answered_in_order(proxy: Proxy) -> None:
    requests = b"".join(f"GET /v1/models?n={n} HTTP/1.1\r\nhost: p\r\n\r\n".encode() for n in range(10))
    with closing(_connect(proxy)) as sock:
        sock.sendall(requests + b"GET /healthz HTTP/1.1\r\nhost: p\r\nconnection: close\r\n\r\n")
        raw = _until_closed(sock, 10)
    assert raw.count(b"HTTP/1.1 200") == 11
    assert raw.rstrip().endswith(b'{"status":"ok"}')


def test_a_client_that_leaves_with_a_request_pipelined_stops_the_stream_it_was_sent(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.token_delay_s, upstream.answer = 0.1, " ".join(f"w{i}." for i in range(60))  # about 6 s
    with closing(_connect(proxy)) as sock:
        sock.sendall(_streamed_chat("hello") + b"GET /healthz HTTP/1.1\r\nhost: p\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.5)
    assert upstream.aborted.wait(3)  # the stream is not read (and judged) to its end for nobody


def test_a_refusal_is_not_written_into_an_answer_being_streamed(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.token_delay_s, upstream.answer = 0.2, " ".join(f"w{i}." for i in range(10))
    with closing(_connect(proxy)) as sock:
        sock.sendall(_streamed_chat("hello"))
        time.sleep(1.0)
        sock.sendall(b"NOT HTTP\r\n\r\n")
        raw = _until_closed(sock, 10)
    _, _, body = raw.partition(b"\r\n\r\n")
    assert b"HTTP/1.1 400" not in body  # no response inside the 200's chunked body
    assert b"data: [DONE]" in body  # the answer is whole; the connection closes after it


def test_a_request_after_an_unread_body_in_the_same_read_is_not_cut_by_the_keep_alive_timer(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = make_proxy(server={"keep_alive_timeout_s": 1, "header_timeout_s": 30})
    upstream.token_delay_s, upstream.answer = 0.2, " ".join(f"word{i}." for i in range(15))  # about 3 s
    with closing(_connect(proxy)) as sock:
        sock.sendall(b"POST /healthz HTTP/1.1\r\nhost: p\r\ncontent-length: 5\r\n\r\n")  # answered unread
        assert sock.recv(65536).startswith(b"HTTP/1.1 404")
        time.sleep(0.2)
        sock.sendall(b"abcde" + _streamed_chat("hello"))  # the body's rest and the next request in one packet
        raw = _until_closed(sock, 10)
    assert b"[DONE]" in raw  # not cut a second in by a keep-alive timer left running for the discarded body


def test_pipelined_requests_with_bodies_are_not_taken_for_an_oversized_head(proxy: Proxy) -> None:
    body = b'{"input": "' + b"a" * 20_000 + b'", "model": "m"}'
    one = b"POST /v1/embeddings HTTP/1.1\r\nhost: p\r\ncontent-type: application/json\r\ncontent-length: "
    one += str(len(body)).encode() + b"\r\n\r\n" + body
    with closing(_connect(proxy)) as sock:
        sock.sendall(one * 4 + b"GET /healthz HTTP/1.1\r\n")  # 80 KB in one write, ending inside a small head
        raw = _until_closed(sock, 3)
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"431" not in raw.split(b"\r\n", 1)[0]


_CHUNKED_CHAT_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\ncontent-type: application/json\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _malformed_answer(raw: bytes) -> dict[str, object]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), raw[:80]
    error: dict[str, object] = json.loads(body)["error"]
    return error


def test_a_malformed_chunk_in_the_heads_read_is_answered_at_once(proxy: Proxy, upstream: FakeUpstream) -> None:
    # the head starts the request's app; the broken chunk size follows in the same read. Before, the refusal was
    # held back for an answer that had not started, and the client got a 408 when the body timeout ran out
    with closing(_connect(proxy)) as sock:
        sock.sendall(_CHUNKED_CHAT_HEAD + b'5\r\n{"mod\r\nZZZZ\r\n\r\n')
        raw = _until_closed(sock, 8)  # the body timeout is 15 s
    assert "malformed" in str(_malformed_answer(raw)["message"]), raw
    assert upstream.requests == []
    with proxy.http() as http:  # the app answered it: it is recorded as what the client got
        assert 'route="/v1/chat/completions",status="400"' in http.get("/metrics").text


def test_a_malformed_chunk_sent_while_the_body_is_awaited_is_answered_at_once(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    with closing(_connect(proxy)) as sock:
        sock.sendall(_CHUNKED_CHAT_HEAD + b'5\r\n{"mod\r\n')
        time.sleep(0.5)  # the app now waits in receive() for the rest of the body
        sock.sendall(b"ZZZZ\r\n\r\n")
        raw = _until_closed(sock, 8)
    assert "malformed" in str(_malformed_answer(raw)["message"]), raw
    assert upstream.requests == []


def test_a_malformed_chunk_in_a_queued_pipelined_request_is_answered_at_once(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    # the broken body belongs to a request queued behind one being answered: before, it was only held back, and
    # once its turn came its app waited for the rest of the body until the body timeout (408 after 15 s)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    first = _CHAT_HEAD + str(len(body)).encode() + b"\r\n\r\n" + body
    with closing(_connect(proxy)) as sock:
        sock.sendall(first + _CHUNKED_CHAT_HEAD + b'5\r\n{"mod\r\nZZZZ\r\n\r\n')
        raw = _until_closed(sock, 8)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [b"200", b"400"], raw[-300:]
    assert "malformed" in raw.decode(errors="replace")
    assert len(upstream.requests) == 1  # the first only


def test_a_client_that_leaves_mid_body_is_recorded_as_gone_not_as_a_fault(
    proxy: Proxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="rsafe_proxy"), closing(_connect(proxy)) as sock:
        sock.sendall(_CHUNKED_CHAT_HEAD + b'5\r\n{"mod\r\n')
        time.sleep(0.5)  # the app now waits in receive() for the rest of the body
    with proxy.http() as http:
        deadline = time.monotonic() + 5
        while 'status="499"' not in (metrics := http.get("/metrics").text) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert 'route="/v1/chat/completions",status="499"' in metrics
    assert 'status="500"' not in metrics
    assert "unexpected error" not in caplog.text
    assert upstream.requests == []
