"""The pooled HTTP client the proxy calls the upstream and the guard with: aiohttp's, behind a small interface.

aiohttp's client parses HTTP in C (llhttp) and keeps a simple per-host pool; on the proxy's hot path one call
costs about a seventh of the CPU of httpx's (benchmarks/README.md, "Proxy CPU per request"), and a screened
request makes three. What the proxy relies on is set here once:

- no cookies (one client serves every tenant: a cookie set for one request must not go out with another's);
- no redirects followed (a Location must never send a request where the proxy did not choose);
- no proxy from the environment, the URL sent as built (the proxy has canonicalised the path: nothing may
  re-resolve it on the way out), no automatic User-Agent or Content-Type;
- TLS verified against certifi's roots, or those in SSL_CERT_FILE / SSL_CERT_DIR where set (as httpx did);
- a connect timeout and a read timeout between chunks (as httpx's), a bounded wait for a pooled connection;
- every failure raised as `RequestTimedOut` or `RequestFailed`, with the cause in words a user can act on."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import certifi
from multidict import CIMultiDictProxy
from yarl import URL

# Response head limits: a line or header of an upstream's answer up to 64 KiB (aiohttp's default, 8 KiB, is
# smaller than some servers' headers).
_MAX_HEAD_LINE = 64 * 1024
_MAX_HEADERS = 256
# How long an idle kept-alive connection is kept (httpx's default: 5 s; servers commonly close at 5-75 s).
_KEEPALIVE_S = 5.0


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


@dataclass(frozen=True)
class Timeouts:
    """`read_s`: the longest wait for the answer's head or its next chunk (and for a free pooled connection);
    `connect_s`: for a TCP (and TLS) connection."""

    read_s: float
    connect_s: float

    def aiohttp(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None, connect=self.read_s + self.connect_s, sock_connect=self.connect_s, sock_read=self.read_s
        )

    @property
    def head_s(self) -> float:
        """The deadline for the answer's head, from the call: a pooled connection (read_s), a new one
        (connect_s), the body written (read_s) and the head awaited (read_s). aiohttp times neither the writing
        of a body nor a wait for "100 Continue": without it a peer that stops reading holds the call for good."""
        return self.connect_s + 3 * self.read_s


def tls_context() -> ssl.SSLContext:
    """Certificate verification against SSL_CERT_FILE / SSL_CERT_DIR where set, else certifi's roots."""
    cafile, capath = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    if cafile and os.path.isfile(cafile):
        return ssl.create_default_context(cafile=cafile)
    if capath and os.path.isdir(capath):
        return ssl.create_default_context(capath=capath)
    return ssl.create_default_context(cafile=certifi.where())


def _describe(error: BaseException) -> str:
    """Why a request failed, in words a user can act on: DNS, refused, TLS, a broken connection."""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return f"the TLS certificate was not accepted ({error.certificate_error})"
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return f"the host name could not be resolved (DNS: {error.os_error.strerror or error.os_error})"
    if isinstance(error, aiohttp.ClientConnectorError | aiohttp.ClientSSLError):
        return os_cause(error.os_error)
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the connection broke (the server closed it)"
    if isinstance(error, OSError):
        return os_cause(error)
    text = str(error) or type(error).__name__
    if "ssl" in text.lower() or "certificate" in text.lower():
        return f"the TLS handshake failed ({text})"
    return f"the connection broke ({type(error).__name__}: {text})"


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


def _failure(error: BaseException) -> RequestFailed:
    """aiohttp's (or asyncio's) error as ours."""
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return RequestTimedOut("no connection within the connect timeout, or none free in the pool", connecting=True)
    if isinstance(error, TimeoutError):  # aiohttp's SocketTimeoutError is one, as is asyncio's
        return RequestTimedOut("no answer within the timeout", connecting=False)
    return RequestFailed(_describe(error))


_FAILURES = (aiohttp.ClientError, OSError, TimeoutError, asyncio.IncompleteReadError)


def _unread(content: aiohttp.StreamReader) -> bytes:
    """The bytes that arrived but were not read yet. aiohttp raises a broken connection's error ahead of them (its
    reader checks for an error before its buffer), so without this the end of an answer that came whole, just
    before the connection broke, would be lost (tests/test_gate_channels.py: a stream that breaks after it
    finished ends normally)."""
    buffer = getattr(content, "_buffer", None)
    if not buffer:
        return b""
    arrived = b"".join(buffer)
    buffer.clear()
    return arrived


class Answer:
    """A response whose body is read as it comes (`chunks`) or whole (`read`); close it when done."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code: int = response.status
        self.headers: CIMultiDictProxy[str] = response.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (decoded where the server compressed it); RequestFailed where it breaks off."""
        content = self._response.content
        try:
            async for chunk in content.iter_any():
                yield chunk
        except _FAILURES as error:
            if arrived := _unread(content):  # what came before the break is the answer's too: passed on first
                yield arrived
            raise _failure(error) from error

    async def read(self, max_bytes: int) -> bytes:
        """The whole body; RequestFailed where it breaks off, AnswerTooLarge past `max_bytes`."""
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) > max_bytes:
                raise AnswerTooLarge(f"the answer is over {max_bytes} bytes")
        return bytes(body)

    async def aclose(self) -> None:
        """Done with it: a body read to its end leaves the connection to the pool, any other closes it."""
        self._response.release()


class HttpClient:
    """A pooled client (`max_connections`, kept alive) with the behaviour in the module's docstring. Its
    aiohttp session is made on first use, on the running loop."""

    def __init__(self, max_connections: int, timeouts: Timeouts, headers: Mapping[str, str] | None = None) -> None:
        self.max_connections = max_connections
        self.timeouts = timeouts
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def _opened(self) -> aiohttp.ClientSession:
        if self.closed:
            raise RequestFailed("the client is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:  # its connections belong to the first loop
            raise RequestFailed("the client was made on another event loop")
        if self._session is None:
            self._loop = loop
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, keepalive_timeout=_KEEPALIVE_S, ssl=tls_context()
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Content-Type"),
                timeout=self.timeouts.aiohttp(),
                trust_env=False,
                max_line_size=_MAX_HEAD_LINE,
                max_field_size=_MAX_HEAD_LINE,
                max_headers=_MAX_HEADERS,
            )
        return self._session

    async def open(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        timeouts: Timeouts | None = None,
    ) -> Answer:
        """Send the request; the answer comes back with its body unread. `url` is sent as given (encoded)."""
        options: dict[str, Any] = {"allow_redirects": False}
        timeouts = timeouts or self.timeouts
        if timeouts is not self.timeouts:
            options["timeout"] = timeouts.aiohttp()
        try:
            target = URL(url, encoded=True)
        except ValueError as error:
            raise RequestFailed(f"the address is not a valid URL ({error})") from None
        try:
            async with asyncio.timeout(timeouts.head_s):
                response = await self._opened().request(method, target, headers=headers, data=content, **options)
        except _FAILURES as error:
            raise _failure(error) from error
        except ValueError as error:  # a header aiohttp will not send (a line break in a value, say)
            raise RequestFailed(f"the request could not be sent ({error})") from None
        return Answer(response)

    async def aclose(self) -> None:
        """Close the pool's connections; the client refuses requests from now on."""
        self.closed = True
        if self._session is not None:
            await self._session.close()
