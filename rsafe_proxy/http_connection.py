"""One HTTP/1.1 connection of the proxy's client (rsafe_proxy.http_client): a request written, its answer read by
llhttp (httptools, the parser the proxy's own server uses), the body handed on as it arrives, with flow control,
and every failure raised as `RequestFailed` or `RequestTimedOut` in words a user can act on."""

from __future__ import annotations

import asyncio
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools

# An answer's head (status line and headers) is refused past 1 MiB, 256 headers or a header of 64 KiB: llhttp
# holds an unfinished header in memory with no bound of its own.
_HEAD_BYTES = 1 << 20
_MAX_HEADERS = 256
_MAX_FIELD = 64 * 1024
# Reading pauses with this much of the body unread (a slow client must not make the proxy hold a fast upstream's
# whole answer) and resumes once the reader is down to the low mark.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# A compressed body is decoded in pieces of at most this size: one read of gzip can stand for a thousand times
# as much.
_PIECE = 256 * 1024


class RequestFailed(Exception):
    """The request could not be sent or its answer broke off; `cause` says why, in words."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class AnswerTooLarge(RequestFailed):
    """The answer's body went past the size its reader allows."""


class RequestTimedOut(RequestFailed):
    """No connection, or no (more) answer, within the timeout."""

    def __init__(self, cause: str, connecting: bool) -> None:
        super().__init__(cause)
        self.connecting = connecting


def os_cause(error: OSError) -> str:
    """An OS-level connection error in words: DNS, refused, TLS, else as the OS says it."""
    if isinstance(error, socket.gaierror):
        return f"the host name could not be resolved (DNS: {error.strerror or error})"
    if isinstance(error, ConnectionRefusedError):
        return "the connection was refused (nothing listens on that port)"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"the TLS certificate was not accepted ({error.verify_message or error.reason})"
    if isinstance(error, ssl.SSLError):
        return f"the TLS handshake failed ({error.reason or error})"
    return f"the connection failed ({error.strerror or error})"


class _HeadRefused(Exception):
    """Raised inside a parser callback to stop reading a head past its limits."""


class _Unasked(Exception):
    """Raised inside a parser callback when a message begins after the answer: bytes no request asked for."""


class _Deflate:
    """A deflate body's decoder: zlib-wrapped where its first bytes say so, else raw (as aiohttp read it)."""

    def __init__(self) -> None:
        self._inner: zlib._Decompress | None = None
        self.unconsumed_tail = b""

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._inner is None:  # a zlib header: CMF says deflate (low nibble 8) and CMF·FLG is a multiple of 31
            wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        piece = self._inner.decompress(data, max_length)
        self.unconsumed_tail = self._inner.unconsumed_tail
        return piece

    def flush(self) -> bytes:
        return self._inner.flush() if self._inner is not None else b""


def _decoder(coding: str) -> zlib._Decompress | _Deflate | None:
    """The decoder of a body sent under `coding` (gzip and deflate, as aiohttp decoded; none for identity)."""
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if coding == "deflate":  # zlib-wrapped as RFC 9110 says, or raw as some servers send it
        return _Deflate()
    raise RequestFailed(f"the answer is encoded as {coding!r}, which the proxy cannot decode")


class Connection(asyncio.Protocol):
    """A connection to one origin, serving one exchange at a time: `exchange` writes a request and waits for its
    answer's head; `take` hands out the body. `reusable` once that answer was read whole on a kept-alive
    connection."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.on_lost: Callable[[], None] | None = None  # the pool's, while it is idle there
        self._busy = False
        self.received = False  # a byte of the current exchange's answer arrived
        self._head_only = False
        self._informational = False
        self._head_done = False
        self._head_bytes = 0
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._decoder: zlib._Decompress | _Deflate | None = None
        self._complete = False
        self._keep_alive = False
        self._error: RequestFailed | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._write_paused = False
        self._until_close = False

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_lost is not None:  # idle in the pool: it leaves it
            on_lost, self.on_lost = self.on_lost, None
            on_lost()
        if self._busy and not self._complete and self._error is None:
            if exc is None and self._head_done and self._until_close:  # a body framed by the connection's end
                self._complete = True
            elif isinstance(exc, OSError):
                self._error = RequestFailed(f"the connection broke ({os_cause(exc)})")
            else:
                self._error = RequestFailed("the connection broke (the server closed it)")
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if not self._busy or self._complete:  # bytes no request asked for: the connection cannot be trusted
            self._keep_alive = False
            self.close()
            return
        self.received = True
        if not self._head_done:
            self._head_bytes += len(data)
            if self._head_bytes > _HEAD_BYTES + len(data):  # what came before this read was all head
                self._fail(RequestFailed(f"the answer's head is over {_HEAD_BYTES} bytes"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(RequestFailed("the server switched to another protocol"))
        except httptools.HttpParserCallbackError as error:
            reason = error.__context__
            if isinstance(reason, RequestFailed):
                self._fail(reason)
            elif isinstance(reason, _HeadRefused):
                self._fail(RequestFailed(f"the answer's head {reason}"))
            else:
                self._fail(RequestFailed(f"the answer is not valid HTTP ({error})"))
        except httptools.HttpParserError as error:
            self._fail(RequestFailed(f"the answer is not valid HTTP ({error})"))

    # -- httptools callbacks -----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # in the same read as the answer: never parsed into it, nor left for the next one
            raise _Unasked()
        self.headers = []
        self._informational = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= _MAX_HEADERS:
            raise _HeadRefused(f"has over {_MAX_HEADERS} headers")
        if len(name) + len(value) > _MAX_FIELD:
            raise _HeadRefused(f"has a header over {_MAX_FIELD} bytes")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # "100 Continue" and the like: the answer comes after it
            self._informational = True
            return
        self.status = status
        length = chunked = False
        coding = ""
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = True
            elif lowered == "transfer-encoding":
                chunked = value.rstrip().lower().endswith("chunked")  # any other coding is framed by the close
            elif lowered == "content-encoding":
                coding = value if not coding else f"{coding}, {value}"
        self._until_close = not (length or chunked or status in (204, 304))
        self._decoder = _decoder(coding) if coding and not self._head_only else None
        self._head_done = True
        if self._head_only:  # the answer to a HEAD has no body, whatever its length says
            self._complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._informational or self._head_only:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive() and not self._head_only
        self._wake()

    # -- one exchange ------------------------------------------------------------------------------------

    async def exchange(self, head: bytes, body: bytes | None, head_by: float, read_s: float) -> None:
        """Write the request, then wait for its answer's head: at the latest by `head_by` (loop time), and within
        `read_s` of the request's last byte leaving."""
        transport = self._transport
        if transport is None or self.closed:
            raise RequestFailed("the connection broke (the server closed it)")
        self._busy = True
        self._head_only = head.startswith(b"HEAD ")
        if body is None:
            transport.write(head)
        elif len(body) <= _LOW_WATER:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        while self._write_paused and not self.closed and not self._head_done:
            await self._wait(head_by, "no answer within the timeout")
        loop = asyncio.get_running_loop()
        deadline = min(head_by, loop.time() + read_s)
        while not self._head_done and self._error is None:
            await self._wait(deadline, "no answer within the timeout")
        if self._error is not None and not self._head_done:
            raise self._error

    async def take(self, read_s: float) -> bytes | None:
        """The next piece of the body (decoded), waiting at most `read_s` for it; None at its end."""
        while True:
            if self._body:
                raw = self._body.popleft()
                self._buffered -= len(raw)
                if self._buffered < _LOW_WATER:
                    self._resume()
                if self._decoder is None:
                    return raw
                piece = self._decode(raw)
                if piece:
                    return piece
                continue
            if self._error is not None:
                raise self._error
            if self._complete:
                rest = self._decoder.flush() if self._decoder is not None else b""
                self._decoder = None
                return rest or None
            await self._wait(asyncio.get_running_loop().time() + read_s, "no more of the answer within the timeout")

    async def whole(self, read_s: float, max_bytes: int) -> bytes:
        """The rest of the body at once (AnswerTooLarge past `max_bytes`)."""
        if self._complete and self._decoder is None and self._error is None:  # it came with its head
            raw = b"".join(self._body) if len(self._body) != 1 else self._body[0]
            self._body.clear()
            self._buffered = 0
            self._resume()
            if len(raw) > max_bytes:
                raise AnswerTooLarge(f"the answer is over {max_bytes} bytes")
            return raw
        pieces: list[bytes] = []
        size = 0
        while (piece := await self.take(read_s)) is not None:
            pieces.append(piece)
            size += len(piece)
            if size > max_bytes:
                raise AnswerTooLarge(f"the answer is over {max_bytes} bytes")
        return b"".join(pieces)

    @property
    def reusable(self) -> bool:
        """The exchange's answer was read to its end, and the server keeps the connection open for another."""
        return (
            self._complete
            and self._keep_alive
            and self._error is None
            and not self._body
            and not self.closed
            and not self._write_paused
            and not self._paused
        )

    def reset(self) -> None:
        """Ready for the next exchange (only after a `reusable` one)."""
        self._resume()
        self._busy = self.received = self._head_done = self._complete = self._keep_alive = False
        self._head_bytes = self.status = 0
        self.headers = []
        self._decoder = None

    def close(self) -> None:
        """Close it now, without waiting for what is still unsent (an unfinished exchange's)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def close_idle(self) -> None:
        """Close it politely (an idle connection: nothing is pending on it)."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # -- inside --------------------------------------------------------------------------------------------

    def _decode(self, raw: bytes) -> bytes:
        decoder = self._decoder
        assert decoder is not None
        try:
            piece = decoder.decompress(raw, _PIECE)
        except zlib.error as error:
            self._decoder = None
            self._error = RequestFailed(f"the answer's compressed body is corrupt ({error})")
            raise self._error from None
        if decoder.unconsumed_tail:
            self._body.appendleft(decoder.unconsumed_tail)
            self._buffered += len(decoder.unconsumed_tail)
        return piece

    def _resume(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _fail(self, error: RequestFailed) -> None:
        if self._complete and self._error is None:  # the answer is whole: only the connection is spoiled
            self._keep_alive = False
            self.close()
            return
        if self._error is None:
            self._error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, deadline: float, timed_out: str) -> None:
        """Until a callback wakes it, at most until `deadline`: RequestTimedOut after."""
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            raise RequestTimedOut(timed_out, connecting=False)
        self._waiter = waiter = loop.create_future()
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            raise RequestTimedOut(timed_out, connecting=False) from None
        finally:
            timer.cancel()
            self._waiter = None


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
