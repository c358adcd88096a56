"""How the proxy is served: uvicorn configured from `server:` in proxy.yaml, with the limits uvicorn lacks.

- a request-head timeout (uvicorn has none: a connection that sends nothing, or half a request line, would stay
  open for good), added by `GuardedH11Protocol`;
- a connection cap answered with an OpenAI-style 503 (uvicorn's `limit_concurrency` answers in plain text);
- the open-file limit raised to its hard limit, and the cap kept below it, so that idle connections cannot use
  up the descriptors a legitimate request needs for its upstream and guard calls;
- graceful shutdown: `ProxyServer` starts the app's drain when it stops accepting connections, so requests in
  flight get `shutdown_grace_s` and streams then end with an error event instead of a broken body.

The body timeouts are ASGI middleware (rsafe_proxy.middleware.BodyTimeout): they belong to the app."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import resource
import socket
from typing import Any, ClassVar

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from rsafe_proxy.config import Settings
from rsafe_proxy.draining import Drain
from rsafe_proxy.errors import AmbiguousFraming, InvalidRequest, ProxyError, RequestTimeout, ServerBusy
from rsafe_proxy.middleware import send_error

log = logging.getLogger("rsafe_proxy")

# Descriptors kept back from the connection cap, besides the upstream and guard pools: listeners, log and
# spans files, policy reloads, the model's files.
_RESERVED_FILES = 64
# uvicorn's own wait, after the drain deadline, for the streams to write their last event and close.
_ENDING_MARGIN_S = 5.0


def raise_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:  # some systems cap it below the hard limit (macOS: OPEN_MAX)
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, error)
    return soft


def connection_cap(settings: Settings, file_limit: int) -> int:
    """server.max_connections, lowered so that client connections leave descriptors for the upstream and guard
    pools: past the cap a client gets a clean 503, never a failed request elsewhere."""
    reserved = settings.upstream.max_connections + settings.guard.max_connections + _RESERVED_FILES
    cap = min(settings.server.max_connections, max(1, file_limit - reserved))
    if cap < settings.server.max_connections:
        log.warning(
            "server.max_connections lowered from %d to %d: the open-file limit is %d, and %d descriptors are kept "
            "for the upstream and guard connections (raise the limit with `ulimit -n`)",
            settings.server.max_connections,
            cap,
            file_limit,
            reserved,
        )
    return cap


def _raw_response(error: ProxyError) -> bytes:
    """`error` as a complete HTTP/1.1 response that closes the connection, for when no request was parsed."""
    body = json.dumps(error.body()).encode()
    head = (
        f"HTTP/1.1 {error.status} {STATUS_PHRASES[error.status].decode()}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout, a connection cap answered in JSON, JSON for malformed
    requests, and no keep-alive reprieve for a body nobody reads. Configured by subclassing (`protocol_class`)."""

    header_timeout_s: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 4096

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limit_concurrency = None  # uvicorn's check answers in plain text; `_capped` answers in JSON
        self._inner: ASGI3Application = self.app
        self.app = self._capped
        self._head_timer: asyncio.TimerHandle | None = None

    async def _capped(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        state = self.server_state
        if len(state.connections) > self.max_connections or len(state.tasks) > self.max_connections:
            busy = ServerBusy("The proxy has too many open connections; retry shortly.")
            await send_error(send, busy)  # type: ignore[arg-type]  # uvicorn's send is ASGI's send, typed apart
            return
        names = {name for name, _ in scope["headers"]} if scope["type"] == "http" else set()
        if b"transfer-encoding" in names and b"content-length" in names:  # h11 takes the chunks and goes on
            smuggled = AmbiguousFraming("The request has both Transfer-Encoding and Content-Length; send one.")
            await send_error(send, smuggled)  # type: ignore[arg-type]
            return
        await self._inner(scope, receive, send)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn cancels the keep-alive timer on every byte. Bytes of a body the app answered without reading
        # are discarded: they must not keep the connection open, so that timer is left running for them.
        discarding = self.cycle is not None and self.cycle.response_complete and self.conn.their_state is h11.SEND_BODY
        if not discarding:
            self._unset_keepalive_if_required()
        self.conn.receive_data(data)
        self.handle_events()
        self._watch_head()

    def _watch_head(self) -> None:
        """Time the request head from its first byte (uvicorn times only the idle gap between requests)."""
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()  # the head is complete (or the connection is going)
        elif self._head_timer is None and self.timeout_keep_alive_task is None:
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # half a request: say why it is closed; a silent one is just closed
            seconds = f"{self.header_timeout_s:g}"
            self.transport.write(_raw_response(RequestTimeout(f"The request head did not arrive within {seconds} s.")))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse, answered as an OpenAI-style error (uvicorn answers in plain text)."""
        error = InvalidRequest(f"{msg} The request line or headers are malformed.")
        body = json.dumps(error.body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body)):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        self.transport.close()


def protocol_class(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol with these limits (uvicorn builds one protocol object per connection, from a class)."""
    limits = {"header_timeout_s": header_timeout_s, "max_connections": max_connections}
    return type("ConfiguredH11Protocol", (GuardedH11Protocol,), limits)


def _drain_of(app: Any) -> Drain | None:
    """The drain of the proxy app's runtime (set by its lifespan); None for any other app."""
    runtime = getattr(getattr(app, "state", None), "runtime", None)
    drain = getattr(runtime, "drain", None)
    return drain if isinstance(drain, Drain) else None


class ProxyServer(uvicorn.Server):
    """uvicorn's server that, when it stops accepting connections (SIGTERM, SIGINT or `should_exit`), gives the
    requests in flight `grace_s` seconds through the app's drain; then their streams end cleanly."""

    def __init__(self, config: uvicorn.Config, grace_s: float) -> None:
        super().__init__(config)
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = _drain_of(self.config.app)
        if drain is not None:
            drain.begin(self.grace_s)
        await super().shutdown(sockets)


def server_config(settings: Settings, app: ASGIApp, file_limit: int | None = None, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration for serving `app` with the limits in `settings.server`; `options` are passed on
    (host, port, log_level...). `file_limit`: the open-file limit the cap must fit (default: the current one)."""
    server = settings.server
    if file_limit is None:
        file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = connection_cap(settings, file_limit)
    fixed: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "http": protocol_class(server.header_timeout_s, cap),
        "ws": "none",  # the proxy serves no WebSocket route
        "timeout_keep_alive": server.keep_alive_timeout_s,
        "timeout_graceful_shutdown": math.ceil(server.shutdown_grace_s + _ENDING_MARGIN_S),
    }
    return uvicorn.Config(app, **{**fixed, **options})


class PortUnavailable(ValueError):
    """The proxy cannot listen where it was told to (the port is taken, privileged, or the address not ours)."""


_BIND_CAUSES = {
    errno.EADDRINUSE: "the port is already in use (is another proxy running? choose another with --port)",
    errno.EACCES: "permission denied (ports below 1024 need privileges; choose another with --port)",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's (see --host)",
}


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, ready for uvicorn to listen on. Bound before anything is loaded, so that a
    port in use stops start-up at once with a clear message (PortUnavailable) instead of after the model load."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise PortUnavailable(f"cannot listen on {host}:{port}: unknown host ({error.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may reuse TIME_WAIT
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        cause = _BIND_CAUSES.get(error.errno or 0, error.strerror or str(error))
        raise PortUnavailable(f"cannot listen on {host}:{port}: {cause}") from None
    sock.set_inheritable(True)
    return sock


def url_of(listener: socket.socket) -> str:
    """The address a bound socket listens on, as a URL (an IPv6 address in brackets)."""
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(settings: Settings, app: ASGIApp, listener: socket.socket | None = None, **options: Any) -> None:
    """Serve `app` until SIGTERM or SIGINT, then shut down gracefully; on `listener` when given (see `bind`).
    Logging is left as the caller set it up (rsafe_proxy.logs), uvicorn's loggers included."""
    file_limit = raise_file_limit()
    config = server_config(settings, app, file_limit, **{"log_config": None, **options})
    ProxyServer(config, settings.server.shutdown_grace_s).run(sockets=None if listener is None else [listener])
