"""The pooled HTTP/1.1 client the proxy calls the upstream and the guard with (rsafe_proxy.http_connection
speaks the protocol on each connection; this module keeps the pool and builds the requests).

It is the proxy's own: aiohttp's client, which it used before, cost about twice its CPU per call on the hot path
(benchmarks/README.md, "Proxy CPU per request"), and a screened request makes three. What the proxy relies on:

- no cookies (one client serves every tenant: a cookie set for one request must not go out with another's);
- no redirects followed (a Location must never send a request where the proxy did not choose);
- no proxy from the environment, the URL sent as built (the proxy has canonicalised the path: nothing may
  re-resolve it on the way out), no header added but Host and the body's Content-Length;
- TLS verified against certifi's roots, or those in SSL_CERT_FILE / SSL_CERT_DIR where set (as httpx did);
- a connect timeout, a read timeout between chunks, a deadline for the answer's head and a bounded wait for a
  pooled connection;
- a gzip or deflate answer decoded (the proxy asks for identity; an upstream may compress anyway);
- every failure raised as `RequestTimedOut` or `RequestFailed`, with the cause in words a user can act on."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import certifi
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from rsafe_proxy.http_connection import AnswerTooLarge as AnswerTooLarge
from rsafe_proxy.http_connection import Connection
from rsafe_proxy.http_connection import RequestFailed as RequestFailed
from rsafe_proxy.http_connection import RequestTimedOut as RequestTimedOut
from rsafe_proxy.http_connection import os_cause as os_cause

# How long an idle kept-alive connection is kept: under the 5 s after which uvicorn (vLLM's server, most Python
# servers) closes one, so that a request is not sent on a connection the server is closing.
_KEEPALIVE_S = 4.0
# A request target as HTTP carries it: visible ASCII (the proxy encoded it), no fragment.
_TARGET = re.compile(r"[!-\x22\x24-~]*")
# Header names and the method are RFC 9110 tokens (the names checked at once, joined by a colon, which no token
# holds); header values must hold no line break and no NUL.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_METHOD = re.compile(_TOKEN)
_NAMES = re.compile(f"{_TOKEN}(?::{_TOKEN})*")
# Framing is the client's to set: a caller's would disagree with the body sent.
_FRAMING = frozenset({"host", "content-length", "transfer-encoding"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Methods a request may be sent again for, on a new connection, when a kept-alive one turns out closed before
# any of the answer came (as aiohttp and urllib3 do): the server cannot have acted on them twice.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True)
class Timeouts:
    """`read_s`: the longest wait for the answer's head or its next chunk (and for a free pooled connection);
    `connect_s`: for a TCP (and TLS) connection."""

    read_s: float
    connect_s: float

    @property
    def head_s(self) -> float:
        """The deadline for the answer's head, from the call: a pooled connection (read_s), a new one
        (connect_s), the body written (read_s) and the head awaited (read_s), so that a peer that stops reading
        the body cannot hold the call for good."""
        return self.connect_s + 3 * self.read_s


def tls_context() -> ssl.SSLContext:
    """Certificate verification against SSL_CERT_FILE / SSL_CERT_DIR where set, else certifi's roots."""
    cafile, capath = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    if cafile and os.path.isfile(cafile):
        return ssl.create_default_context(cafile=cafile)
    if capath and os.path.isdir(capath):
        return ssl.create_default_context(capath=capath)
    return ssl.create_default_context(cafile=certifi.where())


class Origin(NamedTuple):
    """Where connections go: scheme, host and port, and the Host header that names them."""

    secure: bool
    host: str
    port: int
    host_header: str


def origin_of(address: str) -> Origin:
    """The origin of `scheme://authority` (RequestFailed where it is not an http(s) URL's)."""
    try:
        url = URL(address)
    except ValueError as error:
        raise RequestFailed(f"the address is not a valid URL ({error})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise RequestFailed(f"the address is not an http or https URL ({address})")
    if url.user is not None or url.password is not None:
        raise RequestFailed("the address holds credentials, which the proxy does not send")
    secure = url.scheme == "https"
    port = url.port or (443 if secure else 80)
    host = url.host
    named = f"[{host}]" if ":" in host else host
    return Origin(secure, host, port, named if port == (443 if secure else 80) else f"{named}:{port}")


def _split(url: str) -> tuple[str, str]:
    """`url` as its `scheme://authority` and its request target (as given: never decoded or re-encoded)."""
    scheme_end = url.find("://")
    if scheme_end < 0:
        raise RequestFailed(f"the address is not a valid URL ({url[:100]})")
    start = scheme_end + 3
    ends = [at for at in (url.find("/", start), url.find("?", start)) if at >= 0]
    end = min(ends) if ends else len(url)
    target = url[end:] or "/"
    if target[0] == "?":
        target = f"/{target}"
    if not _TARGET.fullmatch(target):
        raise RequestFailed("the address is not a valid URL (its path must be encoded, with no fragment)")
    return url[:end], target


def request_head(method: str, target: str, host: str, headers: Mapping[str, str], length: int | None) -> bytes:
    """The request's head: its line, Host, the caller's headers (never framing), Content-Length."""
    if not _METHOD.fullmatch(method):
        raise RequestFailed("the request could not be sent (the method is not a valid token)")
    names = [name for name in headers if name.lower() not in _FRAMING]
    values = [headers[name] for name in names]
    if names and not _NAMES.fullmatch(":".join(names)):
        raise RequestFailed("the request could not be sent (a header name is not a valid token)")
    joined = "\n".join(values)
    if values and ("\r" in joined or "\x00" in joined or joined.count("\n") != len(values) - 1):
        raise RequestFailed("the request could not be sent (a header value holds a line break)")
    lines = [f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in zip(names, values, strict=True)]
    if length is not None:
        lines.append(f"content-length: {length}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    try:
        return text.encode("latin-1")  # as the proxy's server decoded the client's headers: they go on unchanged
    except UnicodeEncodeError:
        return text.encode("utf-8")  # a configured value beyond latin-1 (the only other choice a server reads)


class Answer:
    """A response whose body is read as it comes (`chunks`) or whole (`read`); close it when done."""

    def __init__(
        self, connection: Connection, pool: _Pool, origin: Origin, read_s: float, busy: set[Connection]
    ) -> None:
        self._connection: Connection | None = connection
        self._pool = pool
        self._origin = origin
        self._read_s = read_s
        self._busy = busy
        self.status_code: int = connection.status
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(connection.headers))

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (decoded where the server compressed it); RequestFailed where it breaks off
        (what arrived before the break comes first)."""
        connection = self._connection
        if connection is None:
            raise RequestFailed("the answer was closed")
        while (piece := await connection.take(self._read_s)) is not None:
            yield piece

    async def read(self, max_bytes: int) -> bytes:
        """The whole body; RequestFailed where it breaks off, AnswerTooLarge past `max_bytes`."""
        if self._connection is None:
            raise RequestFailed("the answer was closed")
        return await self._connection.whole(self._read_s, max_bytes)

    async def aclose(self) -> None:
        """Done with it: a body read to its end leaves the connection to the pool, any other closes it."""
        if (connection := self._connection) is not None:
            self._connection = None
            self._busy.discard(connection)
            self._pool.release(connection, self._origin)


class _Pool:
    """At most `limit` connections, over every origin; the idle ones kept per origin, newest reused first, for
    _KEEPALIVE_S."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.limit = limit
        self.loop = loop
        self._idle: dict[Origin, list[Connection]] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._tls: ssl.SSLContext | None = None
        self.closed = False

    def reuse(self, origin: Origin) -> Connection | None:
        """An idle connection to `origin`, taken out of the pool; None where there is none."""
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            connection.on_lost = None
            if connection.idle_timer is not None:
                connection.idle_timer.cancel()
                connection.idle_timer = None
            if not connection.closed:
                return connection
            self._open -= 1  # closing already (it sent bytes nobody asked for): its slot is free
        return None

    async def connect(self, origin: Origin, timeouts: Timeouts) -> Connection:
        """A new connection to `origin` (or an idle one to it that a wait for room turned up), once the pool has
        room for it: within `timeouts.read_s` in all, however often another caller takes the room first."""
        wait_until = self.loop.time() + timeouts.read_s
        while self._open >= self.limit:
            if self.closed:
                raise RequestFailed("the client is closed")
            if self._close_an_idle_one():
                continue
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(wait_until):
                    await waiter
            except BaseException as error:
                if waiter.done() and not waiter.cancelled():  # woken, but leaving: the room goes to the next
                    self._wake_one()
                if isinstance(error, TimeoutError):
                    raise RequestTimedOut(
                        f"none of the pool's {self.limit} connections came free within the timeout", connecting=False
                    ) from None
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if (reused := self.reuse(origin)) is not None:
                return reused
        if self.closed:
            raise RequestFailed("the client is closed")
        self._open += 1
        try:
            return await self._dial(origin, timeouts.connect_s)
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    async def _dial(self, origin: Origin, connect_s: float) -> Connection:
        tls: ssl.SSLContext | None = None
        if origin.secure:
            tls = self._tls = self._tls or tls_context()
        try:
            async with asyncio.timeout(connect_s):
                _, connection = await self.loop.create_connection(
                    Connection, origin.host, origin.port, ssl=tls, server_hostname=origin.host if tls else None
                )
        except TimeoutError:
            raise RequestTimedOut(
                "no connection within the connect timeout, or none free in the pool", connecting=True
            ) from None
        except OSError as error:
            raise RequestFailed(os_cause(error)) from None
        return connection

    def release(self, connection: Connection, origin: Origin | None = None) -> None:
        """Back to the pool where it can serve another request (to its origin), else closed."""
        if origin is not None and connection.reusable and not self.closed:
            connection.reset()
            idle = self._idle.setdefault(origin, [])
            idle.append(connection)
            connection.on_lost = lambda: self._forget(connection, idle)
            connection.idle_timer = self.loop.call_later(_KEEPALIVE_S, self._expire, connection)
            self._wake_one()
            return
        connection.close()
        self._open -= 1
        self._wake_one()

    def _forget(self, connection: Connection, idle: list[Connection]) -> None:
        """An idle connection leaves the pool (the server closed it, or it was idle too long)."""
        if connection.idle_timer is not None:
            connection.idle_timer.cancel()
            connection.idle_timer = None
        connection.on_lost = None
        idle.remove(connection)
        self._open -= 1
        self._wake_one()

    def _expire(self, connection: Connection) -> None:
        connection.idle_timer = None
        if (on_lost := connection.on_lost) is not None:
            on_lost()
            connection.close_idle()

    def _close_an_idle_one(self) -> bool:
        """Room for a connection to another origin, made by closing one idle here (the oldest of a list)."""
        for idle in self._idle.values():
            if idle:
                self._expire_now(idle[0])
                return True
        return False

    def _expire_now(self, connection: Connection) -> None:
        if connection.idle_timer is not None:
            connection.idle_timer.cancel()
        self._expire(connection)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections; those waiting for room are told the client is closed."""
        self.closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RequestFailed("the client is closed"))
        self._waiters.clear()
        for idle in list(self._idle.values()):
            for connection in list(idle):
                self._expire_now(connection)
        self._idle.clear()


class HttpClient:
    """A pooled client (`max_connections`, kept alive) with the behaviour in the module's docstring. Its pool is
    made on first use, on the running loop."""

    def __init__(self, max_connections: int, timeouts: Timeouts, headers: Mapping[str, str] | None = None) -> None:
        self.max_connections = max_connections
        self.timeouts = timeouts
        self._headers = dict(headers or {})
        self._pool: _Pool | None = None
        self._origins: dict[str, Origin] = {}
        self._busy: set[Connection] = set()
        self.closed = False

    def _opened(self) -> _Pool:
        if self.closed:
            raise RequestFailed("the client is closed")
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = _Pool(self.max_connections, loop)
        elif self._pool.loop is not loop:  # its connections belong to the first loop
            raise RequestFailed("the client was made on another event loop")
        return self._pool

    def _origin(self, address: str) -> Origin:
        origin = self._origins.get(address)
        if origin is None:
            origin = origin_of(address)
            if len(self._origins) >= 256:  # addresses come from configuration; bounded all the same
                self._origins.clear()
            self._origins[address] = origin
        return origin

    async def open(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        timeouts: Timeouts | None = None,
    ) -> Answer:
        """Send the request; the answer comes back with its body unread. `url` is sent as given (encoded)."""
        pool = self._opened()
        timeouts = timeouts or self.timeouts
        address, target = _split(url)
        origin = self._origin(address)
        sent = {**self._headers, **headers} if self._headers and headers else (headers or self._headers)
        length = len(content) if content is not None else (0 if method in _BODY_METHODS else None)
        head = request_head(method, target, origin.host_header, sent, length)
        head_by = pool.loop.time() + timeouts.head_s
        for attempt in (1, 2):
            connection = pool.reuse(origin)
            reused = connection is not None
            if connection is None:
                connection = await pool.connect(origin, timeouts)
            self._busy.add(connection)
            try:
                if pool.loop.time() >= head_by:  # the wait for room took it all: the request is not sent late
                    raise RequestTimedOut("no answer within the timeout", connecting=False)
                await connection.exchange(head, content, head_by, timeouts.read_s)
            except RequestFailed as error:
                self._busy.discard(connection)
                pool.release(connection)
                retry = reused and not connection.received and method in _IDEMPOTENT
                if attempt == 2 or not retry or isinstance(error, RequestTimedOut):
                    raise
                continue
            except BaseException:  # cancelled: the exchange is cut short, and its connection with it
                self._busy.discard(connection)
                pool.release(connection)
                raise
            return Answer(connection, pool, origin, timeouts.read_s, self._busy)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close the pool's connections; the client refuses requests from now on."""
        self.closed = True
        if self._pool is not None:
            self._pool.close()
        for connection in list(self._busy):
            connection.close()
        self._busy.clear()
