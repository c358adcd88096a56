"""The pooled HTTP clients the proxy calls the upstream and the guard with: httpx, its connections on asyncio
streams directly.

httpx's default network backend goes through anyio, and on the proxy's hot path that is a good share of each
outbound call's CPU: every read and write opens an anyio cancel scope, and the pool asks each idle connection, on
every request, whether it has expired, which anyio answers by building a dict of a socket's attributes
(benchmarks/README.md, "Proxy CPU per request"). `AsyncioBackend` is httpcore's network backend on asyncio's own
streams, with timeouts from `asyncio.timeout` and httpcore's exceptions; `client` builds an httpx client on it
that keeps no cookies. Pools, keep-alive, HTTP/1.1 and TLS stay httpx's and httpcore's."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpcore
import httpx
from httpcore._utils import is_socket_readable

# httpcore's socket option type (level, option, value), as its backends take it
_SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]


@contextmanager
def _mapped(timeout: type[Exception], broken: type[Exception]) -> Iterator[None]:
    """asyncio's and the socket's errors as httpcore's: a timeout as `timeout`, a failure as `broken`."""
    try:
        yield
    except TimeoutError as error:
        raise timeout(str(error) or "timed out") from error
    except (OSError, EOFError, asyncio.IncompleteReadError) as error:  # ssl.SSLError is an OSError
        raise broken(str(error) or type(error).__name__) from error


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection: asyncio's reader and writer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()

    async def aclose(self) -> None:
        # no wait for the close to complete: httpcore closes idle connections from inside its pool's lock
        self._writer.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        try:
            with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
                async with asyncio.timeout(timeout):
                    await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except BaseException:
            await self.aclose()
            raise
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "is_readable":
            # asked of an idle connection: the end seen, or a readable socket, means the server closed it
            return self._reader.at_eof() or _readable(self)
        return None


def _readable(stream: AsyncioStream) -> bool:
    sock = stream.get_extra_info("socket")
    return is_socket_readable(sock)  # httpcore's own test (poll, or select where there is none)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on asyncio streams (see the module's docstring)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        options = list(socket_options or [])
        if options:  # asyncio's open_connection sets none: anyio's backend does (httpx passes none by default)
            return await httpcore.AnyIOBackend().connect_tcp(host, port, timeout, local_address, options)
        local = (local_address, 0) if local_address else None
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        return AsyncioStream(reader, writer)  # asyncio sets TCP_NODELAY on TCP sockets

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[_SocketOption] | None = None
    ) -> httpcore.AsyncNetworkStream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path)
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def transport(max_connections: int) -> httpx.AsyncHTTPTransport:
    """httpx's transport (its pool, `max_connections` kept alive too) with its connections on `AsyncioBackend`."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    made = httpx.AsyncHTTPTransport(limits=limits)
    pool = made._pool
    # httpx takes no network backend; its pool keeps the one it was given here (httpcore 1.x)
    if isinstance(pool, httpcore.AsyncConnectionPool) and hasattr(pool, "_network_backend"):
        pool._network_backend = AsyncioBackend()
    return made


def client(max_connections: int, timeout: httpx.Timeout, **options: Any) -> httpx.AsyncClient:
    """A pooled httpx client on `transport(max_connections)` that keeps no cookies; `options` go to
    httpx.AsyncClient (base_url...)."""
    # One client serves every tenant: a cookie the upstream set for one request would go out with the next
    # request of anyone else, so the jar accepts none.
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(timeout=timeout, transport=transport(max_connections), cookies=jar, **options)
