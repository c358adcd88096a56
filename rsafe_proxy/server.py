"""How the proxy is served: uvicorn configured from `server:` in proxy.yaml, with the limits uvicorn lacks.

- a request-head timeout (uvicorn has none: a connection that sends nothing, or half a request line, would stay
  open for good) and a cap on the head's size, added by `GuardedHttpToolsProtocol`;
- a connection cap answered with an OpenAI-style 503 (uvicorn's `limit_concurrency` answers in plain text);
- the open-file limit raised to its hard limit, and the cap kept below it, so that idle connections cannot use
  up the descriptors a legitimate request needs for its upstream and guard calls;
- graceful shutdown: `ProxyServer` starts the app's drain when it stops accepting connections, so requests in
  flight get `shutdown_grace_s` and streams then end with an error event instead of a broken body.

The body timeouts are ASGI middleware (rsafe_proxy.middleware.BodyTimeout): they belong to the app."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import math
import resource
import socket
from collections.abc import Callable
from typing import Any, ClassVar, cast

import httptools
import uvicorn
from starlette.types import ASGIApp
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from rsafe_proxy.config import Settings
from rsafe_proxy.departure import ON_DISCONNECT
from rsafe_proxy.draining import Drain
from rsafe_proxy.errors import HeadTooLarge, InvalidRequest, ProxyError, RequestTimeout, ServerBusy
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
    head = f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return STATUS_LINE[error.status] + head.encode() + body


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the protocol answers with its error and closes."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


class _PipelineFull(Exception):
    """Raised in on_headers_complete to stop parsing ahead of the requests being answered."""


# A body up to this size is copied after its head (one buffer); a larger one is written beside it.
_JOINED_BODY_BYTES = 64 * 1024


class _HeadWithBody(asyncio.Transport):
    """A request cycle's transport, as its cycle sees it: the head of a response whose body has a known length is
    held until the body's first write and goes out with it, one write instead of two (a system call fewer, and
    the client woken once). A head is never held past the cycle's next write or its close; nothing else changes
    (a stream, whose head has no length, has its head written at once)."""

    __slots__ = ("_cycle", "_held", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        super().__init__()
        self._transport = transport
        self._cycle = cycle
        self._held: bytes | None = None  # the head; b"" once it is sent

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held, cycle = self._held, self._cycle
        if held is None and cycle.response_started:  # this is the head
            self._held = b""
            if cycle.chunked_encoding is False and cycle.expected_content_length and cycle.scope["method"] != "HEAD":
                self._held = bytes(data)
                return
        elif held:
            self._held = b""
            if len(data) <= _JOINED_BODY_BYTES:
                self._transport.write(held + data)
            else:  # not copied: one write of both all the same
                self._transport.writelines((held, data))
            return
        self._transport.write(data)

    def close(self) -> None:
        if self._held:
            self._transport.write(self._held)
            self._held = b""
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (llhttp, in C: about half h11's CPU per request, benchmarks/README.md) with
    the limits it lacks: a request-head timeout, a cap on the head's size (llhttp has none: a header that never
    ends would grow in memory), a connection cap answered in JSON, JSON for malformed requests, no keep-alive
    reprieve for a body nobody reads, and no protocol switch (`Upgrade` is served as a plain request, then the
    connection closes). Configured by subclassing (`protocol_class`)."""

    header_timeout_s: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 4096
    max_head_bytes: ClassVar[int] = 64 * 1024
    max_pipelined: ClassVar[int] = 16  # requests parsed ahead of the one being served

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
        self._in_head = False  # a request head has begun and is not complete
        self._in_body = False  # a request body is being read
        self._head_fed = 0  # bytes fed while the head was incomplete (pieces llhttp holds count too)
        self._head_parsed = 0  # the head's request target and headers so far
        self._begun = 0  # messages begun (a read that began one counts only its head's parsed bytes)
        self._serving: Any = None  # the cycle whose app runs (self.cycle is the last one parsed)
        self._broken: tuple[Any, ProxyError] | None = None  # a served request whose body cannot be parsed
        self._held_back = False  # parsing stopped (pipeline full, or a refusal behind a response): close after
        self._departure: tuple[Any, Callable[[], None]] | None = None  # whom to tell the client left (ON_DISCONNECT)

    async def _capped(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        state = self.server_state
        if len(state.connections) > self.max_connections or len(state.tasks) > self.max_connections:
            busy = ServerBusy("The proxy has too many open connections; retry shortly.")
            await send_error(send, busy)  # type: ignore[arg-type]  # uvicorn's send is ASGI's send, typed apart
            return
        cycle = self._serving  # this request's: a cycle's task starts only once the one before it has answered

        def notify(callback: Callable[[], None] | None) -> None:
            """ON_DISCONNECT: `callback` is called if the connection is lost while `cycle` is served."""
            self._departure = (cycle, callback) if callback is not None else None
            if callback is not None and cycle.disconnected:
                callback()

        extensions: dict[str, Any] = cast(dict[str, Any], scope).setdefault("extensions", {})
        extensions[ON_DISCONNECT] = notify

        async def checked() -> Any:
            """The body's next part, or its refusal if what follows could not be parsed (see _refuse)."""
            message = await receive()
            if self._broken is not None and self._broken[0] is cycle:
                raise self._broken[1]
            return message

        await self._inner(scope, checked, send)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        # uvicorn tells only self.cycle (the last request parsed) that the client left
        for cycle in [self._serving, *(queued for queued, _ in self.pipeline)]:
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        departure, self._departure = self._departure, None
        if departure is not None and departure[0] is self._serving and not departure[0].response_complete:
            departure[1]()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._serving = cycle
        super()._start_asgi_task(cycle, app)

    def _in_flight(self) -> bool:
        return self._serving is not None and not self._serving.response_complete

    def data_received(self, data: bytes) -> None:
        # uvicorn cancels the keep-alive timer on every byte. Bytes of a body the app answered without reading
        # are discarded: they must not keep the connection open, so that timer is left running for them.
        discarding = self.cycle is not None and self.cycle.response_complete and self._in_body
        if self._held_back:
            return
        if not discarding:
            self._unset_keepalive_if_required()
        begun = self._begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the request was served as a plain one and closes its connection (on_headers_complete)
        except httptools.HttpParserError as error:
            if isinstance(error.__context__, _PipelineFull):
                return
            refused = error.__context__ if isinstance(error.__context__, _Refused) else None
            self._refuse(refused.error if refused else InvalidRequest(f"The request is malformed: {error}."))
            return
        if self._in_head:
            # a read that began this head also held what came before it: only its parsed part counts
            self._head_fed += len(data) if self._begun == begun else self._head_parsed
            if self._head_fed > self.max_head_bytes:
                self._refuse(_head_too_large(self.max_head_bytes))
                return
        self._watch_head()

    def _refuse(self, error: ProxyError) -> None:
        """Answer `error` and close the connection: through the app when a request handed to it (the one being
        served, or one queued behind it) cannot be parsed in its body (its `receive` raises the error, and the app
        answers it), directly when no request was handed to the app."""
        self._cancel_head_timer()
        broken = self.cycle  # the last request parsed: the one whose body is being read
        handed = broken is self._serving or any(cycle is broken for cycle, _ in self.pipeline)
        if self._in_body and handed and not broken.response_started:
            # the request whose body broke is the one being served, or one queued behind it: its app answers
            # the error at its first receive(), once its turn comes; nothing after it is read
            self._broken = (broken, error)
            self._hold_back()
            broken.message_event.set()
            return
        if self._in_flight():  # an answer is being written: the refusal would land inside it
            self._hold_back()
            return
        if not self.transport.is_closing():
            self.transport.write(_raw_response(error))
            self.transport.close()

    def _hold_back(self) -> None:
        """Read no more; the connection closes once the requests already parsed are answered."""
        self._held_back = True
        self.transport.pause_reading()
        last = self.pipeline[0][0] if self.pipeline else self._serving
        if last is not None:
            last.keep_alive = False

    # -- parser callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun += 1
        super().on_message_begin()
        self._in_head, self._head_fed, self._head_parsed = True, 0, 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # ": " and the line's end
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._head_parsed += size
        if self._head_parsed > self.max_head_bytes:
            raise _Refused(_head_too_large(self.max_head_bytes))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if not self.url.startswith(b"/") or b"#" in self.url:
            # llhttp would hand on only the path of an absolute-form target (whose host a proxy in front may have
            # routed by) and drop a fragment: the proxy serves paths as they are spelled, or not at all
            raise _Refused(InvalidRequest("The request target must be a path, without a scheme, host or fragment."))
        upgrade = self.parser.should_upgrade()
        if upgrade and _declares_body(self.headers):
            # llhttp takes what follows an Upgrade request's head for the new protocol, not for its body
            raise _Refused(InvalidRequest("The proxy does not switch protocols: send the request without Upgrade."))
        if self._in_flight() and len(self.pipeline) >= self.max_pipelined:
            self._hold_back()
            raise _PipelineFull()
        self._in_body = True
        self._unset_keepalive_if_required()  # the keep-alive timer left running for a discarded body
        super().on_headers_complete()
        self.cycle.transport = _HeadWithBody(self.transport, self.cycle)
        if upgrade:  # served as a plain request; what follows on the connection would not be read as HTTP
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    # -- the head timer ------------------------------------------------------------------------------------

    def _waiting_for_head(self) -> bool:
        """Whether the connection waits for a request head: none is being served, and no body is being read."""
        return not self._in_body and (self.cycle is None or self.cycle.response_complete)

    def _watch_head(self) -> None:
        """Time the request head from its first byte (uvicorn times only the idle gap between requests)."""
        if self.transport.is_closing() or not self._waiting_for_head():
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
        if self.transport.is_closing() or not self._waiting_for_head():
            return
        if self._in_head:  # half a request: say why it is closed; a silent one is just closed
            seconds = f"{self.header_timeout_s:g}"
            self.transport.write(_raw_response(RequestTimeout(f"The request head did not arrive within {seconds} s.")))
        self.transport.close()


def _head_too_large(limit: int) -> ProxyError:
    return HeadTooLarge(f"The request line and headers are over {limit // 1024} KiB.")


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request head announces a body (a Transfer-Encoding, or a Content-Length other than 0)."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


def protocol_class(header_timeout_s: float, max_connections: int) -> type[GuardedHttpToolsProtocol]:
    """A GuardedHttpToolsProtocol with these limits (uvicorn builds one protocol object per connection, from a
    class)."""
    limits = {"header_timeout_s": header_timeout_s, "max_connections": max_connections}
    return type("ConfiguredHttpToolsProtocol", (GuardedHttpToolsProtocol,), limits)


def _drain_of(app: Any) -> Drain | None:
    """The drain of the proxy app's runtime (set by its lifespan); None for any other app."""
    runtime = getattr(getattr(app, "state", None), "runtime", None)
    drain = getattr(runtime, "drain", None)
    return drain if isinstance(drain, Drain) else None


class ProxyServer(uvicorn.Server):
    """uvicorn's server that, when it stops accepting connections (SIGTERM, SIGINT or `should_exit`), gives the
    requests in flight `grace_s` seconds through the app's drain; then their streams end cleanly. Once the app
    has started, what start-up built (modules, policies, the model's objects) is frozen for the collector: it
    lives as long as the process, and a full collection would walk it again and again (with torch loaded, about
    230k objects, 0.1 s, a pause for every request in flight)."""

    def __init__(self, config: uvicorn.Config, grace_s: float) -> None:
        super().__init__(config)
        self.grace_s = grace_s

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the app's lifespan first: the runtime, the guard engine
        if self.started:
            gc.collect()
            gc.freeze()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = _drain_of(self.config.app)
        if drain is not None:
            drain.begin(self.grace_s)
        await super().shutdown(sockets)
        gc.unfreeze()


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
