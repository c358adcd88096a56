"""The proxy's HTTP client (rsafe_proxy.http_client), against raw loopback servers: keep-alive reuse, a connection
the server closed while idle, no cookies, no redirects, the URL sent as built, TLS roots, timeouts and refusals
as its own errors."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from rsafe_proxy import http_client
from rsafe_proxy.upstream import forward_headers, returned_headers

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


def _client(read_s: float = 5.0) -> http_client.HttpClient:
    return http_client.HttpClient(4, http_client.Timeouts(read_s, 2.0))


async def _get(client: http_client.HttpClient, url: str, method: str = "GET", body: bytes | None = None) -> bytes:
    answer = await client.open(method, url, {"content-type": "application/json"} if body else None, body)
    try:
        assert answer.status_code == 200, answer.status_code
        return await answer.read(1 << 20)
    finally:
        await answer.aclose()


def test_connections_are_kept_alive_and_reused() -> None:
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await _request(reader):
            writer.write(ANSWER)
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = _client()
        for number in range(5):
            assert await _get(client, f"{url}/v1/x", "POST", b'{"n": %d}' % number) == BODY
        replies = await asyncio.gather(*(_get(client, f"{url}/v1/x", "POST", b"{}") for _ in range(8)))
        assert replies == [BODY] * 8
        await client.aclose()

    assert len(_serve(keep_alive, check)) <= 4  # never more than the pool's cap


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(ANSWER)  # keep-alive, as far as the headers say; then the server closes it anyway
        await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = _client()
        assert await _get(client, f"{url}/a") == BODY
        await asyncio.sleep(0.2)  # the close reaches the client's idle connection
        assert await _get(client, f"{url}/b") == BODY  # on a new connection, no error
        await client.aclose()

    assert len(_serve(one_answer, check)) == 2


def test_cookies_the_server_sets_are_never_sent_back() -> None:
    heads: list[bytes] = []

    async def sets_cookies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await _request(reader):
            heads.append(request)
            writer.write(ANSWER.replace(b"\r\n\r\n", b"\r\nset-cookie: session=tenant-a; Path=/\r\n\r\n", 1))
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = _client()  # one client serves every tenant
        for _ in range(2):
            assert await _get(client, f"{url}/v1/models") == BODY
        await client.aclose()

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
        client = _client()
        for _ in range(3):
            assert await _get(client, f"{url}/v1/models") == BODY
        await client.aclose()

    async def untrusted(url: str, connections: list[int]) -> None:
        client = _client()
        with pytest.raises(http_client.RequestFailed, match="TLS certificate was not accepted"):
            await client.open("GET", url)
        await client.aclose()

    _serve(keep_alive, untrusted, tls)  # certifi's roots do not hold this certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the usual way to name other roots (httpx's, OpenSSL's)
    assert len(_serve(keep_alive, trusted, tls)) == 1


def test_a_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        await asyncio.sleep(5)

    async def check(url: str, connections: list[int]) -> None:
        client = _client(read_s=0.2)
        with pytest.raises(http_client.RequestTimedOut, match="no answer within the timeout") as raised:
            await client.open("GET", url)
        assert not raised.value.connecting
        await client.aclose()

    _serve(silent, check)


def test_a_body_that_stalls_times_out_between_chunks() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(5)

    async def check(url: str, connections: list[int]) -> None:
        client = _client(read_s=0.2)
        answer = await client.open("GET", url)
        with pytest.raises(http_client.RequestTimedOut):
            await answer.read(1 << 20)
        await answer.aclose()
        await client.aclose()

    _serve(stalls, check)


def test_a_body_cut_short_is_a_failure() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        await writer.drain()  # then the connection closes

    async def check(url: str, connections: list[int]) -> None:
        client = _client()
        answer = await client.open("GET", url)
        with pytest.raises(http_client.RequestFailed):
            await answer.read(1 << 20)
        await answer.aclose()
        await client.aclose()

    _serve(cut, check)


def test_a_refused_connection_says_so() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections to it are refused

        async def check() -> None:
            client = _client()
            with pytest.raises(http_client.RequestFailed, match="the connection was refused"):
                await client.open("GET", f"http://127.0.0.1:{port}/")
            await client.aclose()

        asyncio.run(check())


def test_redirects_are_not_followed_and_the_url_goes_as_built() -> None:
    heads: list[bytes] = []

    async def redirects(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await _request(reader):
            heads.append(request)
            writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = _client()
        answer = await client.open("POST", f"{url}/v1/a%2Fb/c?x=%20y", {"content-type": "application/json"}, b"{}")
        assert (answer.status_code, answer.headers["location"]) == (307, "/elsewhere")
        await answer.aclose()
        await client.aclose()

    _serve(redirects, check)
    assert len(heads) == 1  # the Location was not followed
    request_line, *header_lines = heads[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert request_line == b"POST /v1/a%2Fb/c?x=%20y HTTP/1.1"  # neither decoded nor re-encoded
    names = [line.split(b":")[0].lower() for line in header_lines]
    assert b"user-agent" not in names and b"cookie" not in names
    assert b"content-type: application/json" in [line.lower() for line in header_lines]


def test_a_closed_client_refuses_requests() -> None:
    async def check() -> None:
        client = _client()
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

    _serve(never_reads, check)


def test_a_client_refuses_a_second_event_loop() -> None:
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await _request(reader):
            writer.write(ANSWER)
            await writer.drain()

    client = _client()

    async def check(url: str, connections: list[int]) -> None:
        assert await _get(client, f"{url}/a") == BODY

    _serve(keep_alive, check)

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


def test_connections_the_server_closes_free_their_place_in_the_pool() -> None:
    # a pool of one: were the closed connection still counted, the second request would wait for a free one
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(ANSWER)
        await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = http_client.HttpClient(1, http_client.Timeouts(0.5, 1.0))
        for number in range(4):
            assert await _get(client, f"{url}/{number}") == BODY
            await asyncio.sleep(0.05)
        await client.aclose()

    assert len(_serve(one_answer, check)) == 4


def _answers(*raw: bytes) -> Handler:
    """A server that answers its n-th request with raw[n] (keep-alive as far as the bytes say)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in raw:
            if not await _request(reader):
                return
            writer.write(answer)
            await writer.drain()

    return handler


def _one(raw: bytes, check: Callable[[http_client.HttpClient, str], Awaitable[None]]) -> None:
    async def run(url: str, connections: list[int]) -> None:
        client = _client(read_s=1.0)
        try:
            await check(client, url)
        finally:
            await client.aclose()

    _serve(_answers(raw), run)


def test_a_compressed_chunked_answer_is_decoded() -> None:
    import gzip

    packed = gzip.compress(b"x" * 300_000 + b"end")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (packed[:100], packed[100:])) + b"0\r\n\r\n"
    raw = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n" + chunked

    async def check(client: http_client.HttpClient, url: str) -> None:
        answer = await client.open("GET", url)
        pieces = [piece async for piece in answer.chunks()]
        await answer.aclose()
        assert b"".join(pieces) == b"x" * 300_000 + b"end"
        assert max(map(len, pieces)) <= 256 * 1024  # decoded in bounded pieces

    _one(raw, check)


def test_an_encoding_the_proxy_cannot_decode_is_refused() -> None:
    raw = b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 2\r\n\r\nab"

    async def check(client: http_client.HttpClient, url: str) -> None:
        with pytest.raises(http_client.RequestFailed, match="encoded as 'br'"):
            await client.open("GET", url)

    _one(raw, check)


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (b"".join(b"x-%d: v\r\n" % n for n in range(300)), "over 256 headers"),
        (b"x-big: " + b"v" * (70 * 1024) + b"\r\n", "a header over 65536 bytes"),
        (b"x-endless: " + b"v" * (3 << 20), "head is over 1048576 bytes"),
        (b"content-length: 2\r\ntransfer-encoding: chunked\r\n", "not valid HTTP"),
    ],
)
def test_an_answer_head_past_its_limits_or_ambiguous_is_refused(head: bytes, says: str) -> None:
    raw = b"HTTP/1.1 200 OK\r\n" + head + b"\r\n0\r\n\r\n"

    async def check(client: http_client.HttpClient, url: str) -> None:
        with pytest.raises(http_client.RequestFailed, match=says):
            await client.open("GET", url)

    _one(raw, check)


@pytest.mark.parametrize(
    "headers", [{"x-a": "one\r\nx-injected: two"}, {"x-a": "one\nx-b"}, {"bad name": "v"}, {"x-a": "nul\x00"}]
)
def test_a_header_that_would_split_the_request_is_not_sent(headers: dict[str, str]) -> None:
    async def check(client: http_client.HttpClient, url: str) -> None:
        with pytest.raises(http_client.RequestFailed, match="could not be sent"):
            await client.open("GET", url, headers)

    _one(ANSWER, check)


def test_an_informational_answer_is_skipped_and_a_head_answer_has_no_body() -> None:
    continued = b"HTTP/1.1 100 Continue\r\n\r\n" + ANSWER
    head_answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n"  # the length a GET's body would have

    async def check(url: str, connections: list[int]) -> None:
        client = _client(read_s=1.0)
        assert await _get(client, url) == BODY
        answer = await client.open("HEAD", url)
        assert (answer.status_code, await answer.read(10)) == (200, b"")
        await answer.aclose()
        await client.aclose()

    _serve(_answers(continued, head_answer), check)


def test_a_kept_alive_connection_found_closed_is_retried_only_for_an_idempotent_request() -> None:
    # the server takes a second request on a kept-alive connection and closes it unanswered (the race of a
    # server closing an idle connection as the client reuses it): a GET is sent again on a new connection,
    # a POST is not (the server may have acted on it)
    async def closes_on_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(ANSWER)
        await writer.drain()
        await _request(reader)

    async def check(url: str, connections: list[int]) -> None:
        client = _client(read_s=1.0)
        assert await _get(client, f"{url}/a") == BODY
        assert await _get(client, f"{url}/b") == BODY
        with pytest.raises(http_client.RequestFailed, match="the connection broke"):
            await _get(client, f"{url}/c", "POST", b"{}")
        await client.aclose()

    # /a and /b (sent again) on the first two; the POST on the second, which took it and closed unanswered
    assert len(_serve(closes_on_second, check)) == 2


def test_a_cancelled_call_closes_its_connection() -> None:
    async def slow_then_fine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await _request(reader):
            await asyncio.sleep(0.3)
            writer.write(ANSWER)
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = _client()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.open("GET", f"{url}/slow")
        assert await _get(client, f"{url}/next") == BODY  # not the answer meant for the cancelled call
        await client.aclose()

    assert len(_serve(slow_then_fine, check)) == 2


def test_an_answer_framed_by_the_connection_end_is_read_whole() -> None:
    raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it"

    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(raw)
        await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = _client(read_s=1.0)
        assert await _get(client, url) == b"all of it"
        await client.aclose()

    _serve(closes, check)


def test_a_slow_reader_pauses_the_connection() -> None:
    total = 8 << 20

    async def floods(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        for _ in range(total // 65536):
            writer.write(b"y" * 65536)
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = _client(read_s=2.0)
        answer = await client.open("GET", url)
        chunks = answer.chunks()
        await chunks.__anext__()
        await asyncio.sleep(0.3)  # the server writes as fast as it can meanwhile
        held = answer._connection._buffered  # type: ignore[union-attr]
        assert held < 2 << 20, held  # what the proxy holds stays near the high-water mark, not the 8 MiB
        size = sum([len(piece) async for piece in chunks])
        assert size > total - (1 << 20)
        await answer.aclose()
        await client.aclose()

    _serve(floods, check)


def test_an_answer_that_arrived_whole_unread_leaves_its_connection_reading() -> None:
    # 300 KB landing while the caller is busy elsewhere pauses reading; the connection must not go back to the
    # pool paused (the next request on it would never be answered)
    big = b"a" * 300_000
    first = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big)
    second = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond"

    async def check(url: str, connections: list[int]) -> None:
        client = _client(read_s=1.0)
        answer = await client.open("GET", f"{url}/a")
        await asyncio.sleep(0.3)
        assert await answer.read(1 << 20) == big
        await answer.aclose()
        assert await _get(client, f"{url}/b") == b"second"
        await client.aclose()

    assert len(_serve(_answers(first, second), check)) == 1


def test_a_message_after_the_answer_in_the_same_read_is_never_read_as_an_answer() -> None:
    smuggled = b"HTTP/1.1 200 OK\r\nx-who: smuggled\r\ncontent-length: 40\r\n\r\nleft-for-the-next-"
    raw = ANSWER.replace(b"\r\n\r\n", b"\r\nx-who: a\r\n\r\n", 1) + smuggled

    async def check(url: str, connections: list[int]) -> None:
        client = _client(read_s=1.0)
        answer = await client.open("GET", f"{url}/a")
        assert (answer.headers["x-who"], await answer.read(1 << 20)) == ("a", BODY)
        await answer.aclose()
        assert await _get(client, f"{url}/b") == BODY  # on a new connection: the spoiled one was closed
        await client.aclose()

    assert len(_serve(_answers(raw, raw), check)) == 2


def test_room_in_the_pool_goes_to_the_next_caller_when_the_woken_one_has_left() -> None:
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"

    async def check(url: str, connections: list[int]) -> None:
        client = http_client.HttpClient(1, http_client.Timeouts(3.0, 2.0))
        holder = await client.open("GET", f"{url}/x")  # holds the only connection
        await holder.read(10)
        gone = asyncio.create_task(client.open("GET", f"{url}/gone"))
        waiting = asyncio.create_task(_get(client, f"{url}/waiting"))
        await asyncio.sleep(0.1)
        await holder.aclose()  # wakes the first in line, whose caller leaves in the same tick
        gone.cancel()
        started = asyncio.get_running_loop().time()
        assert await waiting == b"ok"
        assert asyncio.get_running_loop().time() - started < 1
        await client.aclose()

    _serve(_answers(closing), check)


def test_a_caller_waiting_for_room_is_refused_once_its_time_is_up_and_nothing_is_sent() -> None:
    heads: list[bytes] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await _request(reader):
            heads.append(request.split(b"\r\n")[0])
            await asyncio.sleep(0.15)
            writer.write(ANSWER)
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = http_client.HttpClient(1, http_client.Timeouts(0.5, 0.5))

        async def busy() -> None:  # keeps the one connection busy with request after request
            for number in range(8):
                await _get(client, f"{url}/busy{number}")

        keeper = asyncio.create_task(busy())
        await asyncio.sleep(0.05)
        with pytest.raises(http_client.RequestTimedOut, match="came free within the timeout"):
            await client.open("GET", f"{url}/late")
        keeper.cancel()
        await client.aclose()

    _serve(slow, check)
    assert b"GET /late HTTP/1.1" not in heads


def test_closing_the_client_refuses_the_callers_waiting_for_room() -> None:
    async def check(url: str, connections: list[int]) -> None:
        client = http_client.HttpClient(1, http_client.Timeouts(2.0, 2.0))
        holder = await client.open("GET", f"{url}/x")
        waiting = asyncio.create_task(client.open("GET", f"{url}/w"))
        await asyncio.sleep(0.1)
        await client.aclose()
        with pytest.raises(http_client.RequestFailed, match="closed"):
            await waiting
        await holder.aclose()

    _serve(_answers(ANSWER, ANSWER), check)


@pytest.mark.parametrize(
    ("method", "headers"), [("GET", {"x-a\ntransfer-encoding": "chunked"}), ("GET /admin HTTP/1.1\r\n\r\nGET", {})]
)
def test_a_name_or_method_that_would_split_the_request_is_not_sent(method: str, headers: dict[str, str]) -> None:
    async def check(client: http_client.HttpClient, url: str) -> None:
        with pytest.raises(http_client.RequestFailed, match="could not be sent"):
            await client.open(method, url, headers)

    _one(ANSWER, check)


@pytest.mark.parametrize(
    ("head", "body", "read"),
    [
        (b"transfer-encoding: identity\r\n", b"all of it", b"all of it"),  # framed by the connection's end
        (b"content-encoding: deflate\r\ncontent-length: 7\r\n", b"\xcbH\xcd\xc9\xc9\x07\x00", b"hello"),  # raw
        (
            b"content-encoding: deflate\r\ncontent-length: 13\r\n",
            b"x\x9c\xcbH\xcd\xc9\xc9\x07\x00\x06,\x02\x15",
            b"hello",
        ),
    ],
)
def test_other_framings_and_deflate_as_servers_send_them(head: bytes, body: bytes, read: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + body

    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(raw)
        await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = _client(read_s=1.0)
        assert await _get(client, url) == read
        await client.aclose()

    _serve(closes, check)
