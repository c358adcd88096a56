"""W3C trace context across the proxy's hops: read from a caller's headers, written into the headers of each
call the proxy makes (the upstream, a served guard). A leaf: it imports nothing of the proxy, so an engine that
forwards the trace context needs none of the telemetry package."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# traceparent and tracestate only: baggage is the caller's business, not a proxy's to re-issue
PROPAGATOR = TraceContextTextMapPropagator()
TRACE_HEADERS = frozenset(PROPAGATOR.fields)


def extract(headers: Mapping[str, str]) -> Context:
    """The caller's trace context from its `traceparent`/`tracestate` (an empty context when absent or invalid)."""
    return PROPAGATOR.extract(headers)


def inject(headers: MutableMapping[str, str]) -> None:
    """Set `traceparent`/`tracestate` to the current (the proxy's own) span context, replacing any the caller
    sent: the next hop's spans hang off the proxy's, not off the caller's."""
    for name in [name for name in headers if name.lower() in TRACE_HEADERS]:
        del headers[name]
    PROPAGATOR.inject(headers)
