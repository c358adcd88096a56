"""Graceful shutdown inside the app: the deadline after which requests in flight stop, and the clean ending
of an event stream cut by it (a final error event, then the end of the chunked body).

The server (rsafe_proxy.server) starts the drain when it stops accepting connections; every wait bounded by
`Drain.bounded` then ends at the deadline, however long it was meant to last."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from rsafe_proxy.telemetry.context import decision_id

SHUTDOWN_MESSAGE = "The proxy is shutting down; the request was stopped. Retry it."
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


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

    @contextlib.asynccontextmanager
    async def bounded(self) -> AsyncIterator[asyncio.Timeout]:
        """A block that raises TimeoutError at the shutdown deadline (no deadline while the proxy serves)."""
        async with asyncio.timeout_at(self._deadline) as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)


class _Ending:
    """What a cut event stream ends with: the Responses API's `response.failed` (with the response the stream
    announced, so SDKs that track it accept the event), else the generic `data: {"error": ...}` that every
    OpenAI SDK raises as an APIError. Either error object carries the request's decision id (`decision_id`),
    as every error body does."""

    def __init__(self, decision: str | None = None) -> None:
        self.known = {} if decision is None else {"decision_id": decision}
        self.response: dict[str, Any] | None = None
        self.sequence = -1
        self.at_boundary = True

    def saw(self, chunk: bytes) -> None:
        self.at_boundary = chunk.endswith((b"\n\n", b"\r\n\r\n"))
        if not chunk.startswith(b"event: response."):  # a Responses API event, as the proxy sends them
            return
        for number in _SEQUENCE.findall(chunk):
            self.sequence = max(self.sequence, int(number))
        if self.response is None:
            self.response = _announced_response(chunk)

    def event(self, message: str) -> bytes:
        blank = b"" if self.at_boundary else b"\n\n"  # close an event the stream had not finished
        if self.response is None:
            error = {
                "message": message,
                "type": "server_error",
                "param": None,
                "code": "server_shutting_down",
                **self.known,
            }
            return blank + b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
        failed = {
            **self.response,
            "status": "failed",
            "error": {"code": "server_error", "message": message, **self.known},
            "incomplete_details": None,
        }
        data = {"type": "response.failed", "response": failed, "sequence_number": self.sequence + 1}
        return blank + b"event: response.failed\ndata: " + json.dumps(data).encode() + b"\n\n"


def _announced_response(chunk: bytes) -> dict[str, Any] | None:
    for line in chunk.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                data = json.loads(line[5:])
            except ValueError:
                return None
            response = data.get("response") if isinstance(data, dict) else None
            return response if isinstance(response, dict) else None
    return None


async def until_drained(chunks: AsyncIterator[bytes], drain: Drain) -> AsyncIterator[bytes]:
    """The event stream `chunks`, ended cleanly at the shutdown deadline: the wait for the next chunk is
    cancelled (and with it the upstream read and any screening), a final error event is sent, and the body ends
    as a well-formed chunked response. Held-back text that was not judged yet is never sent."""
    ending = _Ending(decision_id())  # the stream is sent in the request's trace context
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
                yield ending.event(SHUTDOWN_MESSAGE)
                return
            ending.saw(chunk)
            yield chunk
            if scope.expired():  # the source swallowed the cancellation and produced a chunk anyway
                yield ending.event(SHUTDOWN_MESSAGE)
                return
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
