"""The proxy's HTTP client (rsafe_proxy.http_client) against answers that break the rules or its limits, and its
pool under pressure: heads past their caps, smuggled or stray messages, request splitting, decoding, flow
control, the retry rule, cancellation, and the wait for a free connection."""

from __future__ import annotations

import asyncio
import gzip

import pytest

from rsafe_proxy import http_client
from tests.raw_servers import ANSWER, BODY, answer_once, answers, client_of, get, read_request, serve


def test_connections_the_server_closes_free_their_place_in_the_pool() -> None:
    # a pool of one: were the closed connection still counted, the second request would wait for a free one
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ANSWER)
        await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = http_client.HttpClient(1, http_client.Timeouts(0.5, 1.0))
        for number in range(4):
            assert await get(client, f"{url}/{number}") == BODY
            await asyncio.sleep(0.05)
        await client.aclose()

    assert len(serve(one_answer, check)) == 4


def test_a_compressed_chunked_answer_is_decoded() -> None:
    packed = gzip.compress(b"x" * 300_000 + b"end")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (packed[:100], packed[100:])) + b"0\r\n\r\n"
    raw = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n" + chunked

    async def check(client: http_client.HttpClient, url: str) -> None:
        answer = await client.open("GET", url)
        pieces = [piece async for piece in answer.chunks()]
        await answer.aclose()
        assert b"".join(pieces) == b"x" * 300_000 + b"end"
        assert max(map(len, pieces)) <= 256 * 1024  # decoded in bounded pieces

    answer_once(raw, check)


def test_an_encoding_the_proxy_cannot_decode_is_refused() -> None:
    raw = b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 2\r\n\r\nab"

    async def check(client: http_client.HttpClient, url: str) -> None:
        with pytest.raises(http_client.RequestFailed, match="encoded as 'br'"):
            await client.open("GET", url)

    answer_once(raw, check)


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

    answer_once(raw, check)


@pytest.mark.parametrize(
    "headers", [{"x-a": "one\r\nx-injected: two"}, {"x-a": "one\nx-b"}, {"bad name": "v"}, {"x-a": "nul\x00"}]
)
def test_a_header_that_would_split_the_request_is_not_sent(headers: dict[str, str]) -> None:
    async def check(client: http_client.HttpClient, url: str) -> None:
        with pytest.raises(http_client.RequestFailed, match="could not be sent"):
            await client.open("GET", url, headers)

    answer_once(ANSWER, check)


def test_an_informational_answer_is_skipped_and_a_head_answer_has_no_body() -> None:
    continued = b"HTTP/1.1 100 Continue\r\n\r\n" + ANSWER
    head_answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n"  # the length a GET's body would have

    async def check(url: str, connections: list[int]) -> None:
        client = client_of(read_s=1.0)
        assert await get(client, url) == BODY
        answer = await client.open("HEAD", url)
        assert (answer.status_code, await answer.read(10)) == (200, b"")
        await answer.aclose()
        await client.aclose()

    serve(answers(continued, head_answer), check)


def test_a_kept_alive_connection_found_closed_is_retried_only_for_an_idempotent_request() -> None:
    # the server takes a second request on a kept-alive connection and closes it unanswered (the race of a
    # server closing an idle connection as the client reuses it): a GET is sent again on a new connection,
    # a POST is not (the server may have acted on it)
    async def closes_on_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ANSWER)
        await writer.drain()
        await read_request(reader)

    async def check(url: str, connections: list[int]) -> None:
        client = client_of(read_s=1.0)
        assert await get(client, f"{url}/a") == BODY
        assert await get(client, f"{url}/b") == BODY
        with pytest.raises(http_client.RequestFailed, match="the connection broke"):
            await get(client, f"{url}/c", "POST", b"{}")
        await client.aclose()

    # /a and /b (sent again) on the first two; the POST on the second, which took it and closed unanswered
    assert len(serve(closes_on_second, check)) == 2


def test_a_cancelled_call_closes_its_connection() -> None:
    async def slow_then_fine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            await asyncio.sleep(0.3)
            writer.write(ANSWER)
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = client_of()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.open("GET", f"{url}/slow")
        assert await get(client, f"{url}/next") == BODY  # not the answer meant for the cancelled call
        await client.aclose()

    assert len(serve(slow_then_fine, check)) == 2


def test_a_slow_reader_pauses_the_connection() -> None:
    total = 8 << 20

    async def floods(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        for _ in range(total // 65536):
            writer.write(b"y" * 65536)
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = client_of(read_s=2.0)
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

    serve(floods, check)


def test_an_answer_that_arrived_whole_unread_leaves_its_connection_reading() -> None:
    # 300 KB landing while the caller is busy elsewhere pauses reading; the connection must not go back to the
    # pool paused (the next request on it would never be answered)
    big = b"a" * 300_000
    first = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big)
    second = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond"

    async def check(url: str, connections: list[int]) -> None:
        client = client_of(read_s=1.0)
        answer = await client.open("GET", f"{url}/a")
        await asyncio.sleep(0.3)
        assert await answer.read(1 << 20) == big
        await answer.aclose()
        assert await get(client, f"{url}/b") == b"second"
        await client.aclose()

    assert len(serve(answers(first, second), check)) == 1


def test_a_message_after_the_answer_in_the_same_read_is_never_read_as_an_answer() -> None:
    smuggled = b"HTTP/1.1 200 OK\r\nx-who: smuggled\r\ncontent-length: 40\r\n\r\nleft-for-the-next-"
    raw = ANSWER.replace(b"\r\n\r\n", b"\r\nx-who: a\r\n\r\n", 1) + smuggled

    async def check(url: str, connections: list[int]) -> None:
        client = client_of(read_s=1.0)
        answer = await client.open("GET", f"{url}/a")
        assert (answer.headers["x-who"], await answer.read(1 << 20)) == ("a", BODY)
        await answer.aclose()
        assert await get(client, f"{url}/b") == BODY  # on a new connection: the spoiled one was closed
        await client.aclose()

    assert len(serve(answers(raw, raw), check)) == 2


def test_room_in_the_pool_goes_to_the_next_caller_when_the_woken_one_has_left() -> None:
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"

    async def check(url: str, connections: list[int]) -> None:
        client = http_client.HttpClient(1, http_client.Timeouts(3.0, 2.0))
        holder = await client.open("GET", f"{url}/x")  # holds the only connection
        await holder.read(10)
        gone = asyncio.create_task(client.open("GET", f"{url}/gone"))
        waiting = asyncio.create_task(get(client, f"{url}/waiting"))
        await asyncio.sleep(0.1)
        await holder.aclose()  # wakes the first in line, whose caller leaves in the same tick
        gone.cancel()
        started = asyncio.get_running_loop().time()
        assert await waiting == b"ok"
        assert asyncio.get_running_loop().time() - started < 1
        await client.aclose()

    serve(answers(closing), check)


def test_a_caller_waiting_for_room_is_refused_once_its_time_is_up_and_nothing_is_sent() -> None:
    heads: list[bytes] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            heads.append(request.split(b"\r\n")[0])
            await asyncio.sleep(0.15)
            writer.write(ANSWER)
            await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = http_client.HttpClient(1, http_client.Timeouts(0.5, 0.5))

        async def busy() -> None:  # keeps the one connection busy with request after request
            for number in range(8):
                await get(client, f"{url}/busy{number}")

        keeper = asyncio.create_task(busy())
        await asyncio.sleep(0.05)
        with pytest.raises(http_client.RequestTimedOut, match="came free within the timeout"):
            await client.open("GET", f"{url}/late")
        keeper.cancel()
        await client.aclose()

    serve(slow, check)
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

    serve(answers(ANSWER, ANSWER), check)


@pytest.mark.parametrize(
    ("method", "headers"), [("GET", {"x-a\ntransfer-encoding": "chunked"}), ("GET /admin HTTP/1.1\r\n\r\nGET", {})]
)
def test_a_name_or_method_that_would_split_the_request_is_not_sent(method: str, headers: dict[str, str]) -> None:
    async def check(client: http_client.HttpClient, url: str) -> None:
        with pytest.raises(http_client.RequestFailed, match="could not be sent"):
            await client.open(method, url, headers)

    answer_once(ANSWER, check)


@pytest.mark.parametrize(
    ("head", "body", "read"),
    [
        (b"content-type: text/plain\r\n", b"all of it", b"all of it"),  # no length: framed by the connection's end
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
        await read_request(reader)
        writer.write(raw)
        await writer.drain()

    async def check(url: str, connections: list[int]) -> None:
        client = client_of(read_s=1.0)
        assert await get(client, url) == read
        await client.aclose()

    serve(closes, check)
