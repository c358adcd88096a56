"""Pure ASGI middleware: the catch-all error boundary, the request body timeouts and the body size limit."""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rsafe_proxy.errors import InternalError, MethodNotAllowed, PayloadTooLarge, ProxyError, RequestTimeout
from rsafe_proxy.telemetry.context import note_error, traced_body

log = logging.getLogger("rsafe_proxy")

_DRAIN_LIMIT = 256 * 1024 * 1024  # read and discard at most this much, so the client gets its 413 cleanly


async def send_error(send: Send, error: ProxyError) -> None:
    """Send `error` as an OpenAI-style JSON response."""
    body = json.dumps(traced_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode()) for name, value in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_client_gone(send: Send) -> None:
    """Record 499 for a client that left before its answer began (nothing reaches the wire: it is gone)."""
    await send({"type": "http.response.start", "status": 499, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


INTERNAL_MESSAGE = "The proxy failed to handle this request; the fault is in its log."


async def last_resort(request: Request, error: Exception) -> Response:
    """Starlette's handler of last resort (its ServerErrorMiddleware, outside every middleware of the app): what
    escapes even ErrorBoundary, from a middleware outside it, is still an OpenAI-style JSON 500 naming nothing of
    the cause, never Starlette's plain-text "Internal Server Error". Starlette re-raises the error after this
    answer, so the server logs its traceback."""
    return JSONResponse(InternalError(INTERNAL_MESSAGE).body(), status_code=500)


class ErrorBoundary:
    """Whatever escapes the app is answered as an OpenAI-style JSON error, never uvicorn's plain-text 500.

    A ProxyError keeps its status and code; anything else is a 500 `internal_error` whose body names nothing of
    the cause (the trace goes to the log). A client that left while its body was read is recorded as 499, with
    no trace: it is not a fault. Once a response has started, its status is sent and cannot change: the
    response is left incomplete, so the server closes the connection and the client sees a cut transfer, never
    a shorter answer ended as if whole. A ProxyError then (an upstream answer that broke off while passed
    through) is logged in a warning (uvicorn adds its own "returned without completing response" line); anything
    else is re-raised, its trace logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:  # Starlette's, for a client gone while its body was read: no fault of ours
            if not started:
                await send_client_gone(send)
        except HTTPException as error:  # Starlette's refusal of a method (the app has no ExceptionMiddleware)
            if started:
                raise
            await send_error(send, _refusal(scope, error))
        except Exception as error:
            if started and isinstance(error, ProxyError):
                note_error(error.code or type(error).__name__)
                log.warning("%s %s cut after its answer began: %s", scope.get("method"), scope.get("path"), error)
                return
            if started:
                raise
            if not isinstance(error, ProxyError):
                log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
                error = InternalError(INTERNAL_MESSAGE)
            await send_error(send, error)


def _refusal(scope: Scope, error: HTTPException) -> ProxyError:
    """Starlette's HTTPException as the proxy's error: a 405 names the methods allowed; anything else is no refusal
    the routes make (a fault, answered as a 500 and logged)."""
    if error.status_code == 405:
        allow = (error.headers or {}).get("Allow", "")
        return MethodNotAllowed(f"{scope.get('method')} is not allowed on {scope.get('path')}: use {allow}.", allow)
    log.error("unexpected HTTP %d raised answering %s %s", error.status_code, scope.get("method"), scope.get("path"))
    return InternalError(INTERNAL_MESSAGE)


class BodyTimeout:
    """Bounds how long the app waits for the request body: `idle_s` between two chunks, `total_s` for all of it
    from the start of the request. A client past either gets 408 (RequestTimeout, raised from `receive`).

    Once the body is complete `receive` is left alone: the app then waits on it for the client's disconnect."""

    def __init__(self, app: ASGIApp, idle_s: float, total_s: float) -> None:
        self.app = app
        self.idle_s = idle_s
        self.total_s = total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s
        complete = False

        async def timed() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(min(deadline, loop.time() + self.idle_s)):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"The request body did not arrive in time (at most {self.idle_s:g} s between two reads, "
                    f"{self.total_s:g} s in all)."
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


class BodyLimit:
    """Refuses bodies over `max_bytes` with 413, whether declared by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than this proxy's limit of {self.max_bytes} bytes.")

    async def _drain(self, receive: Receive, seen: int) -> None:
        more = True
        try:
            while more and seen < _DRAIN_LIMIT:
                message = await receive()
                if message["type"] != "http.request":
                    return
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
        except RequestTimeout:  # a body that trickles is not waited for: the 413 says what is wrong with it
            return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive, 0)
            await send_error(send, self._error())
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if message.get("more_body", False):
                        await self._drain(receive, seen)
                    raise self._error()
            return message

        await self.app(scope, limited, send)
