"""Raw loopback HTTP servers for the tests of the proxy's own HTTP client (tests/test_http_client*.py): each
connection served by a handler that writes exactly the bytes a test names."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

from rsafe_proxy import http_client

BODY = b'{"ok": true}'
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request head and its body (content-length framed), or b"" at the end of the connection."""
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + (await reader.readexactly(length) if length else b"")


def serve(
    handler: Handler, check: Callable[[str, list[int]], Awaitable[None]], tls: ssl.SSLContext | None = None
) -> list[int]:
    """Run `check(url, connections)` against a loopback server running `handler` per connection; returns the
    count of connections opened, one entry each."""
    connections: list[int] = []

    async def main() -> None:
        async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(counted, "127.0.0.1", 0, ssl=tls)
        port = server.sockets[0].getsockname()[1]
        async with server:
            await check(f"{'https' if tls else 'http'}://127.0.0.1:{port}", connections)

    asyncio.run(main())
    return connections


def client_of(read_s: float = 5.0) -> http_client.HttpClient:
    return http_client.HttpClient(4, http_client.Timeouts(read_s, 2.0))


async def get(client: http_client.HttpClient, url: str, method: str = "GET", body: bytes | None = None) -> bytes:
    answer = await client.open(method, url, {"content-type": "application/json"} if body else None, body)
    try:
        assert answer.status_code == 200, answer.status_code
        return await answer.read(1 << 20)
    finally:
        await answer.aclose()


def answers(*raw: bytes) -> Handler:
    """A server that answers its n-th request with raw[n] (keep-alive as far as the bytes say)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in raw:
            if not await read_request(reader):
                return
            writer.write(answer)
            await writer.drain()

    return handler


def answer_once(raw: bytes, check: Callable[[http_client.HttpClient, str], Awaitable[None]]) -> None:
    async def run(url: str, connections: list[int]) -> None:
        client = client_of(read_s=1.0)
        try:
            await check(client, url)
        finally:
            await client.aclose()

    serve(answers(raw), run)
