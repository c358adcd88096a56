"""The proxy's HTTP clients on asyncio streams (rsafe_proxy.http_client), against raw loopback servers: keep-alive
reuse, a connection the server closed while idle, timeouts and refusals as httpx's errors."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from rsafe_proxy import http_client

BODY = b'{"ok": true}'
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _request(reader: asyncio.StreamReader) -> bytes:
    """One request head and its body (content-length framed), or b"" at the end of the connection."""
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + (await reader.readexactly(length) if length else b"")


def _serve(
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


def test_the_pool_runs_on_asyncio_streams() -> None:
    # httpx takes no network backend: http_client sets it on httpcore's pool, which must still read it from there
    transport = http_client.transport(4)
    assert isinstance(transport._pool._network_backend, http_client.AsyncioBackend)


def test_connections_are_kept_alive_and_reused() -> None:
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await _request(reader):
            writer.write(ANSWER)
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        async with http_client.client(4, httpx.Timeout(5)) as client:
            for number in range(5):
                reply = await client.post(f"{url}/v1/x", json={"n": number})
                assert reply.json() == {"ok": True}
            replies = await asyncio.gather(*(client.post(f"{url}/v1/x", json={}) for _ in range(8)))
            assert all(reply.status_code == 200 for reply in replies)

    assert len(_serve(keep_alive, check)) <= 4  # never more than the pool's cap


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(ANSWER)  # keep-alive, as far as the headers say; then the server closes it anyway
        await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        async with http_client.client(4, httpx.Timeout(5)) as client:
            assert (await client.get(f"{url}/a")).status_code == 200
            await asyncio.sleep(0.2)  # the close reaches the client's idle connection
            assert (await client.get(f"{url}/b")).status_code == 200  # on a new connection, no error

    assert len(_serve(one_answer, check)) == 2


def test_cookies_the_server_sets_are_never_sent_back() -> None:
    heads: list[bytes] = []

    async def sets_cookies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await _request(reader):
            heads.append(request)
            writer.write(ANSWER.replace(b"\r\n\r\n", b"\r\nset-cookie: session=tenant-a; Path=/\r\n\r\n", 1))
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        async with http_client.client(4, httpx.Timeout(5)) as client:  # one client serves every tenant
            for _ in range(2):
                assert (await client.get(f"{url}/v1/models")).status_code == 200

    _serve(sets_cookies, check)
    assert len(heads) == 2
    assert b"cookie" not in heads[1].lower()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_is_verified_and_kept_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    command += ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(command, check=True, capture_output=True)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await _request(reader):
            writer.write(ANSWER)
            await writer.drain()

    async def trusted(url: str, connections: list[int]) -> None:
        async with http_client.client(4, httpx.Timeout(5)) as client:
            for _ in range(3):
                assert (await client.get(f"{url}/v1/models")).json() == {"ok": True}

    async def untrusted(url: str, connections: list[int]) -> None:
        async with http_client.client(4, httpx.Timeout(5)) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(url)

    _serve(keep_alive, untrusted, tls)  # the system's roots do not hold this certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx's own way to name the roots
    assert len(_serve(keep_alive, trusted, tls)) == 1


def test_a_silent_server_times_out_as_httpx_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        await asyncio.sleep(5)

    async def check(url: str, connections: list[int]) -> None:
        async with http_client.client(4, httpx.Timeout(0.2)) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get(url)

    _serve(silent, check)


def test_a_refused_connection_is_httpx_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections to it are refused

        async def check() -> None:
            async with http_client.client(4, httpx.Timeout(2)) as client:
                with pytest.raises(httpx.ConnectError):
                    await client.get(f"http://127.0.0.1:{port}/")

        asyncio.run(check())
