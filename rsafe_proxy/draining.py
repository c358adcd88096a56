"""Graceful shutdown inside the app: the deadline after which requests in flight stop, and the clean ending
of an event stream cut by it (a final error event, then the end of the chunked body).

The server (rsafe_proxy.server) starts the drain when it stops accepting connections; every wait bounded by
`Drain.bounded` then ends at the deadline, however long it was meant to last."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from types import TracebackType

from rsafe_proxy.errors import ServerShuttingDown
from rsafe_proxy.telemetry.context import decision_id

SHUTDOWN_MESSAGE = "The proxy is shutting down; the request was stopped. Retry it."


class Drain:
    """The shutdown deadline of one running proxy (None until the server starts shutting down)."""

    def __init__(self) -> None:
        self._deadline: float | None = None
        self._scopes: set[asyncio.Timeout] = set()

    def begin(self, grace_s: float) -> None:
        """Shutdown begins: every bounded wait, running or to come, ends `grace_s` from now (the first call
        counts). Must be called on the event loop."""
        if self._deadline is not None:
            return
        self._deadline = asyncio.get_running_loop().time() + grace_s
        for scope in list(self._scopes):
            scope.reschedule(self._deadline)

    def bounded(self) -> _Bounded:
        """A block (`async with`) that raises TimeoutError at the shutdown deadline (no deadline while the proxy
        serves); it gives the block's asyncio.Timeout."""
        return _Bounded(self)


class _Bounded:
    """asyncio.Timeout at the drain's deadline, known to the drain (Drain.begin reschedules it) while entered: its
    own class, as a generator-based context manager around asyncio.timeout_at cost more than the rest, on every
    request."""

    def __init__(self, drain: Drain) -> None:
        self._drain = drain
        self._scope = asyncio.timeout_at(drain._deadline)

    async def __aenter__(self) -> asyncio.Timeout:
        scope, deadline = self._scope, self._drain._deadline
        await scope.__aenter__()
        if deadline is not None and scope.when() != deadline:
            scope.reschedule(deadline)  # the drain began since the block was made
        self._drain._scopes.add(scope)
        return scope

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._drain._scopes.discard(self._scope)
        await self._scope.__aexit__(kind, error, traceback)


def _error_event(message: str, decision: str | None) -> bytes:
    """The generic end of a stream the proxy does not read: `data: {"error": ...}`, which every OpenAI SDK raises
    as an APIError, its error object carrying the request's decision id (`decision_id`), as every error body does."""
    body = ServerShuttingDown(message).body()
    known = {} if decision is None else {"decision_id": decision}
    return b"data: " + json.dumps({"error": {**body["error"], **known}}).encode() + b"\n\n"


async def until_drained(
    chunks: AsyncIterator[bytes], drain: Drain, ending: Callable[[str], bytes | None] | None = None
) -> AsyncIterator[bytes]:
    """The event stream `chunks`, ended cleanly at the shutdown deadline: the wait for the next chunk is
    cancelled (and with it the upstream read and any screening), a final error event is sent (`ending`'s, as the
    stream's API ends a failed stream: the Responses API's `response.failed`; where it has none, the generic
    error event), and the body ends as a well-formed chunked response. Held-back text that was not judged yet
    is never sent."""
    decision = decision_id()  # the stream is sent in the request's trace context
    at_boundary = True

    def stop() -> bytes:
        blank = b"" if at_boundary else b"\n\n"  # close an event the stream had not finished
        own = ending(SHUTDOWN_MESSAGE) if ending is not None else None
        return blank + (own if own is not None else _error_event(SHUTDOWN_MESSAGE, decision))

    try:
        while True:
            try:
                async with drain.bounded() as scope:
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not scope.expired():
                    raise
                yield stop()
                return
            at_boundary = chunk.endswith((b"\n\n", b"\r\n\r\n"))
            yield chunk
            if scope.expired():  # the source swallowed the cancellation and produced a chunk anyway
                yield stop()
                return
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
