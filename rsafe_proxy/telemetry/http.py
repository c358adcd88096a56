"""The HTTP server span of every request (pure ASGI middleware, outermost), the one span of a screened request
too (the pipeline adds its tenant, policy and outcome): it continues the caller's W3C trace, returns the trace id
as `x-rsafe-decision-id`, the proxy's own time as `x-rsafe-overhead-ms` and the client's `x-request-id` (unless
the upstream named its own) on every response, and counts requests, errors, overhead and what is in flight."""

from __future__ import annotations

import re
from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, format_trace_id
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rsafe_proxy.telemetry import Recorder
from rsafe_proxy.telemetry.context import RequestRecord, with_record
from rsafe_proxy.telemetry.genai import fail
from rsafe_proxy.tracecontext import extract

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
_SET_HERE = frozenset({b"x-rsafe-decision-id", b"x-rsafe-overhead-ms"})
UNMATCHED = "unmatched"  # the route label of a request refused before routing
# A client's request id worth echoing: visible ASCII, short (it is the client's own text, sent back as is).
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _route(scope: Scope) -> str | None:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


def _failed(span: Span) -> bool:
    """Whether the request's work already marked its span failed (an SDK span has a status; a span of no trace,
    none)."""
    status = getattr(span, "status", None)
    return isinstance(status, Status) and status.status_code is StatusCode.ERROR


class TraceRequests:
    """A SERVER span per HTTP request, current while the app serves it. `recorder` gives the running proxy's
    recorder (None before start-up: the request is served untraced)."""

    def __init__(self, app: ASGIApp, recorder: Callable[[], Recorder | None]) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        recorder = self.recorder() if scope["type"] == "http" else None
        if recorder is None:
            await self.app(scope, receive, send)
            return
        metrics = recorder.metrics
        headers = _headers(scope)
        method = scope["method"] if scope["method"] in _METHODS else "_OTHER"
        parent = extract(headers)
        attributes = {
            "http.request.method": method,
            "url.path": scope.get("path", ""),
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        if client := scope.get("client"):
            attributes["client.address"] = client[0]
        if agent := headers.get("user-agent"):
            attributes["user_agent.original"] = agent[:256]
        span = recorder.tracer.start_span(method, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        record = RequestRecord()
        decision_id = format_trace_id(span.get_span_context().trace_id).encode()
        # the client's x-request-id (forwarded upstream as it is) comes back where the answer names none of its
        # own (the upstream's wins: it is the id its operator knows); none is made up when the client sent none,
        # the decision id names the request then
        request_id = headers.get("x-request-id", "")
        echoed = [(b"x-request-id", request_id.encode())] if _REQUEST_ID.fullmatch(request_id) else []
        token = otel_context.attach(with_record(trace.set_span_in_context(span, parent), record))
        status: int | None = None
        streamed = False
        body_done = False
        metrics.requests_in_flight.inc()

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # after the body, the app waits here for a disconnect: that is no waiting on anyone
                return await receive()
            with record.waiting():
                message = await receive()
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def traced_send(message: Message) -> None:
            nonlocal status, streamed
            if message["type"] == "http.response.start":
                status = int(message["status"])
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() not in _SET_HERE]
                streamed = any(
                    name.lower() == b"content-type" and value.startswith(b"text/event-stream") for name, value in kept
                )
                overhead = f"{record.overhead() * 1000:.1f}".encode()
                kept += [(b"x-rsafe-decision-id", decision_id), (b"x-rsafe-overhead-ms", overhead)]
                if not any(name.lower() == b"x-request-id" for name, _ in kept):
                    kept += echoed
                message = {**message, "headers": kept}
                if streamed:
                    metrics.streams_in_flight.inc()
            with record.waiting():  # a slow reader holds the send: the client's time, not the proxy's
                await send(message)

        try:
            await self.app(scope, timed_receive, traced_send)
        except BaseException as error:
            fail(span, type(error).__qualname__)
            raise
        finally:
            otel_context.detach(token)
            route = _route(scope)
            span.update_name(f"{method} {route}" if route else method)
            span.set_attribute("url.path", scope.get("path", ""))  # canonical once CanonicalPath has run
            if route:
                span.set_attribute("http.route", route)
            if record.tenant:
                span.set_attribute("rsafe.tenant", record.tenant)
            if status is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500 and not _failed(span):  # the pipeline's error code, where it set one, stays
                    fail(span, str(status))
            if record.error:
                metrics.errors.labels(record.error).inc()
            elif status is not None and status >= 500:
                metrics.errors.labels(f"http_{status}").inc()
            route_label = route or UNMATCHED
            metrics.requests.labels(record.tenant or "none", route_label, str(status or 0)).inc()
            metrics.overhead_seconds.labels(route_label).observe(record.overhead())
            metrics.requests_in_flight.dec()
            if streamed:
                metrics.streams_in_flight.dec()
            span.end()
