"""The per-request telemetry context: the decision id, and the time a request spends waiting on others (the
guard, the upstream, the client), which the proxy's own overhead excludes. The W3C trace context in and out is
rsafe_proxy.tracecontext.

Everything here lives in the OpenTelemetry context of one request (a contextvar, copied into the tasks the
request starts), never at module level."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context

from rsafe_proxy.errors import ProxyError

_RECORD = otel_context.create_key("rsafe.request")

T = TypeVar("T")


@dataclass
class RequestRecord:
    """What one request's telemetry collects while it runs: its tenant once known, and the union of the intervals
    it spent waiting on someone else (overlapping waits, as a guard call beside an upstream call, count once)."""

    started: float = field(default_factory=time.perf_counter)
    tenant: str = ""
    error: str = ""  # the code of the error the request was answered with, if any
    waited: float = 0.0
    _open: int = 0
    _since: float = 0.0

    def waiting(self) -> RequestRecord:
        """Time spent inside `with record.waiting():` is waiting, not the proxy's own work (the record is its own
        context manager: a generator-based one cost more than the bookkeeping, a dozen times a request)."""
        return self

    def __enter__(self) -> None:
        if self._open == 0:
            self._since = time.perf_counter()
        self._open += 1

    def __exit__(self, *_: object) -> None:
        self._open -= 1
        if self._open == 0:
            self.waited += time.perf_counter() - self._since

    def overhead(self) -> float:
        """Seconds since the start that were the proxy's own (not waiting), so far."""
        now = time.perf_counter()
        waiting = self.waited + (now - self._since if self._open else 0.0)
        return max(0.0, now - self.started - waiting)


def with_record(parent: Context, record: RequestRecord) -> Context:
    """`parent` carrying `record` for everything the request does."""
    return otel_context.set_value(_RECORD, record, parent)


def current_record() -> RequestRecord | None:
    """The record of the request being served here, if any."""
    value = otel_context.get_value(_RECORD)
    return value if isinstance(value, RequestRecord) else None


def waiting() -> AbstractContextManager[None]:
    """Mark the block as waiting on another party (no-op outside a traced request)."""
    record = current_record()
    return record.waiting() if record is not None else nullcontext()


async def waited(items: AsyncIterator[T]) -> AsyncIterator[T]:
    """`items`, the wait for each one counted as waiting."""
    iterator = aiter(items)
    while True:
        with waiting():
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
        yield item


def note_tenant(tenant: str) -> None:
    """The request being served belongs to `tenant` (its metrics are labelled so)."""
    if (record := current_record()) is not None:
        record.tenant = tenant


def note_error(code: str) -> None:
    """The request being served is answered with the error `code` (counted in rsafe_errors_total)."""
    if (record := current_record()) is not None:
        record.error = code


def decision_id() -> str | None:
    """The decision id of the request being served: its trace id (32 hex digits), or None outside a trace."""
    span_context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else None


def traced_body(error: ProxyError) -> dict[str, Any]:
    """`error`'s OpenAI-style body with the decision id (`error.decision_id`), noting the error's code for the
    request's metrics."""
    note_error(error.code or type(error).__name__)
    body = error.body()
    if (identifier := decision_id()) is not None:
        body["error"] = {**body["error"], "decision_id": identifier}
    return body
