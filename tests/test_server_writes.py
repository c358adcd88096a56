"""What the proxy's server writes to a client's connection, write by write: a response whose body has a length
goes out in one write (its head with its body), a stream's head at once, and a head is never held back for good
(a HEAD request, an app that fails after its head). The protocol is rsafe_proxy.server's, over a transport that
records what it is given."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from rsafe_proxy.server import protocol_class

App = Callable[[Scope, Receive, Send], Awaitable[None]]


class Recorded(asyncio.Transport):
    """A connection's transport that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None


async def _served(app: App, request: bytes, until: Callable[[Recorded], bool]) -> Recorded:
    """`request` fed to a connection of the proxy's protocol serving `app`; the transport once `until` holds."""
    config = uvicorn.Config(app, log_config=None, lifespan="off")
    protocol = protocol_class(10.0, 100)(config, ServerState(), {}, asyncio.get_running_loop())
    transport = Recorded()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(200):
        if until(transport):
            break
        await asyncio.sleep(0.005)
    protocol.connection_lost(None)
    return transport


POST = b"POST /v1/embeddings HTTP/1.1\r\nhost: proxy\r\ncontent-length: 2\r\n\r\n{}"


async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def _complete(transport: Recorded) -> bool:
    return b"".join(transport.writes).endswith(b'{"ok":true}')


def test_a_response_with_a_length_goes_out_in_one_write() -> None:
    transport = asyncio.run(_served(_answer, POST, _complete))
    assert len(transport.writes) == 1, transport.writes
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b'content-length: 11\r\n\r\n{"ok":true}')


def test_a_large_body_goes_out_with_its_head_in_one_write_too() -> None:
    body = b"x" * 200_000

    async def large(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    transport = asyncio.run(_served(large, POST, lambda t: b"".join(t.writes).endswith(body)))
    assert len(transport.writes) == 1 and transport.writes[0].endswith(b"\r\n\r\n" + body)


def test_consecutive_responses_on_one_connection_each_go_out_in_one_write() -> None:
    transport = asyncio.run(_served(_answer, POST * 3, lambda t: len(t.writes) >= 3))
    assert len(transport.writes) == 3 and all(w.endswith(b'\r\n\r\n{"ok":true}') for w in transport.writes)


def test_a_streams_head_is_written_before_its_first_chunk() -> None:
    async def main() -> tuple[Recorded, list[bytes]]:
        release = asyncio.Event()
        before: list[bytes] = []

        async def stream(scope: Scope, receive: Receive, send: Send) -> None:
            await receive()
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await release.wait()
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        def until(transport: Recorded) -> bool:
            if not release.is_set() and transport.writes:
                before.extend(transport.writes)
                release.set()
            return b"".join(transport.writes).endswith(b"0\r\n\r\n")

        return await _served(stream, POST, until), before

    transport, before = asyncio.run(main())
    assert len(before) == 1 and before[0].startswith(b"HTTP/1.1 200 OK\r\n") and before[0].endswith(b"\r\n\r\n")
    assert b"".join(transport.writes).endswith(b"data: 1\n\n\r\n0\r\n\r\n")


def test_the_head_of_a_head_request_is_written_though_no_body_follows() -> None:
    request = b"HEAD /v1/models HTTP/1.1\r\nhost: proxy\r\n\r\n"
    transport = asyncio.run(_served(_answer, request, lambda t: bool(t.writes)))
    assert len(transport.writes) == 1 and transport.writes[0].endswith(b"content-length: 11\r\n\r\n")


def test_a_head_held_for_its_body_is_written_when_the_app_fails_instead() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
        raise RuntimeError("the app broke after its head")

    transport = asyncio.run(_served(failing, POST, lambda t: t.closed))
    assert transport.closed
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
