"""The proxy's HTTP client (rsafe_proxy.http_client), against raw loopback servers: keep-alive reuse, a connection
the server closed while idle, no cookies, no redirects, the URL sent as built, TLS roots, timeouts and refusals
as its own errors."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from rsafe_proxy import http_client
from rsafe_proxy.upstream import forward_headers, returned_headers
from tests.raw_servers import ANSWER, BODY, client_of, get, read_request, serve


def test_connections_are_kept_alive_and_reused() -> None:
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(ANSWER)
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = client_of()
        for number in range(5):
            assert await get(client, f"{url}/v1/x", "POST", b'{"n": %d}' % number) == BODY
        replies = await asyncio.gather(*(get(client, f"{url}/v1/x", "POST", b"{}") for _ in range(8)))
        assert replies == [BODY] * 8
        await client.aclose()

    assert len(serve(keep_alive, check)) <= 4  # never more than the pool's cap


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ANSWER)  # keep-alive, as far as the headers say; then the server closes it anyway
        await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = client_of()
        assert await get(client, f"{url}/a") == BODY
        await asyncio.sleep(0.2)  # the close reaches the client's idle connection
        assert await get(client, f"{url}/b") == BODY  # on a new connection, no error
        await client.aclose()

    assert len(serve(one_answer, check)) == 2


def test_cookies_the_server_sets_are_never_sent_back() -> None:
    heads: list[bytes] = []

    async def sets_cookies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            heads.append(request)
            writer.write(ANSWER.replace(b"\r\n\r\n", b"\r\nset-cookie: session=tenant-a; Path=/\r\n\r\n", 1))
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = client_of()  # one client serves every tenant
        for _ in range(2):
            assert await get(client, f"{url}/v1/models") == BODY
        await client.aclose()

    serve(sets_cookies, check)
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
        while await read_request(reader):
            writer.write(ANSWER)
            await writer.drain()

    async def trusted(url: str, connections: list[int]) -> None:
        client = client_of()
        for _ in range(3):
            assert await get(client, f"{url}/v1/models") == BODY
        await client.aclose()

    async def untrusted(url: str, connections: list[int]) -> None:
        client = client_of()
        with pytest.raises(http_client.RequestFailed, match="TLS certificate was not accepted"):
            await client.open("GET", url)
        await client.aclose()

    serve(keep_alive, untrusted, tls)  # certifi's roots do not hold this certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the usual way to name other roots (httpx's, OpenSSL's)
    assert len(serve(keep_alive, trusted, tls)) == 1


def test_a_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def check(url: str, connections: list[int]) -> None:
        client = client_of(read_s=0.2)
        with pytest.raises(http_client.RequestTimedOut, match="no answer within the timeout") as raised:
            await client.open("GET", url)
        assert not raised.value.connecting
        await client.aclose()

    serve(silent, check)


def test_a_body_that_stalls_times_out_between_chunks() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(5)

    async def check(url: str, connections: list[int]) -> None:
        client = client_of(read_s=0.2)
        answer = await client.open("GET", url)
        with pytest.raises(http_client.RequestTimedOut):
            await answer.read(1 << 20)
        await answer.aclose()
        await client.aclose()

    serve(stalls, check)


def test_a_body_cut_short_is_a_failure() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        await writer.drain()  # then the connection closes

    async def check(url: str, connections: list[int]) -> None:
        client = client_of()
        answer = await client.open("GET", url)
        with pytest.raises(http_client.RequestFailed):
            await answer.read(1 << 20)
        await answer.aclose()
        await client.aclose()

    serve(cut, check)


def test_a_refused_connection_says_so() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections to it are refused

        async def check() -> None:
            client = client_of()
            with pytest.raises(http_client.RequestFailed, match="the connection was refused"):
                await client.open("GET", f"http://127.0.0.1:{port}/")
            await client.aclose()

        asyncio.run(check())


def test_redirects_are_not_followed_and_the_url_goes_as_built() -> None:
    heads: list[bytes] = []

    async def redirects(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            heads.append(request)
            writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = client_of()
        answer = await client.open("POST", f"{url}/v1/a%2Fb/c?x=%20y", {"content-type": "application/json"}, b"{}")
        assert (answer.status_code, answer.headers["location"]) == (307, "/elsewhere")
        await answer.aclose()
        await client.aclose()

    serve(redirects, check)
    assert len(heads) == 1  # the Location was not followed
    request_line, *header_lines = heads[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert request_line == b"POST /v1/a%2Fb/c?x=%20y HTTP/1.1"  # neither decoded nor re-encoded
    names = [line.split(b":")[0].lower() for line in header_lines]
    assert b"user-agent" not in names and b"cookie" not in names
    assert b"content-type: application/json" in [line.lower() for line in header_lines]


def test_a_closed_client_refuses_requests() -> None:
    async def check() -> None:
        client = client_of()
        await client.aclose()
        with pytest.raises(http_client.RequestFailed, match="closed"):
            await client.open("GET", "http://127.0.0.1:9/")

    asyncio.run(check())


def test_a_server_that_stops_reading_the_body_times_out() -> None:
    # aiohttp times neither the writing of a body nor a wait for "100 Continue": the call has a deadline for the
    # answer's head (connect + 3 x read), so a peer that reads the head and then nothing cannot hold it for good
    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(10)

    async def check(url: str, connections: list[int]) -> None:
        client = http_client.HttpClient(4, http_client.Timeouts(0.2, 0.2))
        started = asyncio.get_running_loop().time()
        with pytest.raises(http_client.RequestTimedOut):
            await client.open("POST", f"{url}/v1/x", {"content-type": "application/json"}, b"x" * (32 << 20))
        assert asyncio.get_running_loop().time() - started < 5
        await client.aclose()

    serve(never_reads, check)


def test_a_client_refuses_a_second_event_loop() -> None:
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(ANSWER)
            await writer.drain()

    client = client_of()

    async def check(url: str, connections: list[int]) -> None:
        assert await get(client, f"{url}/a") == BODY

    serve(keep_alive, check)

    async def elsewhere() -> None:  # its pooled connections belong to the loop it was first used on
        with pytest.raises(http_client.RequestFailed, match="another event loop"):
            await client.open("GET", "http://127.0.0.1:9/")

    asyncio.run(elsewhere())


def test_headers_the_proxy_could_not_send_on_are_dropped_and_expect_is_not_forwarded() -> None:
    # aiohttp reads header values leniently (a control character passes); uvicorn refuses to send one, which would
    # drop the client's connection with no answer: such a header is left out instead
    answer = {
        "x-fine": "a\tb",
        "x-control": "a\x0bb",
        "x-wide": "caf\u00e9 \u2603",
        "bad name": "x",
        "x-rsafe-input": "allow",
    }
    assert returned_headers(answer) == {"x-fine": "a\tb"}
    assert "expect" not in forward_headers({"expect": "100-continue", "content-type": "application/json"}, None)
