"""Where spans go, configured the standard way: a JSON-lines file (telemetry.spans_file) and OTLP selected by the
OTEL_* variables (endpoint, protocol grpc or http/protobuf, headers, timeouts), with the resource from
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES."""

from __future__ import annotations

import datetime
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext
from opentelemetry.util.types import Attributes

PROTOCOLS = ("grpc", "http/protobuf")


class JsonLinesExporter(SpanExporter):
    """Writes each finished span as one JSON line: decisions visible without a collector."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._resource: tuple[Resource, bytes] | None = None  # the spans' resource, as the line's JSON end, once

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = b"".join(self.line(span) + b"\n" for span in spans)
        try:
            # one write on an O_APPEND descriptor: the batch lands whole even when several worker processes
            # append to the same file (a buffered file would write it in pieces that could interleave)
            with self._lock:
                descriptor = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    written = os.write(descriptor, data)
                    while written < len(data):  # a short write (a full disk, a signal) goes on where it stopped
                        written += os.write(descriptor, data[written:])
                finally:
                    os.close(descriptor)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def line(self, span: ReadableSpan) -> bytes:
        """`span` as `ReadableSpan.to_json(indent=None)` writes it, field for field (compact JSON). to_json turns
        the resource (the same for every span) into JSON with an indent, which takes json's pure-Python encoder,
        and parses it back, for each span, and formats its times with strftime: together a tenth of a screened
        request's CPU. Here the resource is encoded once and spliced in, and the rest is encoded by orjson."""
        if self._resource is None or self._resource[0] is not span.resource:
            self._resource = (span.resource, b',"resource":' + _encode(json.loads(span.resource.to_json())) + b"}")
        parent = span.parent
        status = {"status_code": span.status.status_code.name}
        if span.status.description:
            status["description"] = span.status.description
        fields = {
            "name": span.name,
            "context": _context(span.context) if span.context else None,
            "kind": str(span.kind),
            "parent_id": f"0x{parent.span_id:016x}" if parent is not None else None,
            "start_time": iso_time(span.start_time) if span.start_time else None,
            "end_time": iso_time(span.end_time) if span.end_time else None,
            "status": status,
            "attributes": _plain(span.attributes),
            "events": [
                {"name": event.name, "timestamp": iso_time(event.timestamp), "attributes": _plain(event.attributes)}
                for event in span.events
            ],
            "links": [
                {"context": _context(link.context), "attributes": _plain(link.attributes)} for link in span.links
            ],
        }
        return _encode(fields)[:-1] + self._resource[1]


def _encode(value: Any) -> bytes:
    """`value` as JSON: orjson, or json where orjson refuses (a lone surrogate in user text, an integer past 64
    bits), so that no span is lost for what it holds."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value, separators=(",", ":")).encode()


def _context(context: SpanContext) -> dict[str, str]:
    return {
        "trace_id": f"0x{context.trace_id:032x}",
        "span_id": f"0x{context.span_id:016x}",
        "trace_state": repr(context.trace_state),
    }


def _plain(attributes: Attributes) -> dict[str, Any] | None:
    return None if attributes is None else dict(attributes)


def iso_time(nanoseconds: int) -> str:
    """As opentelemetry.sdk.util.ns_to_iso_str writes it (the same rounding), without strftime."""
    at = datetime.datetime.fromtimestamp(nanoseconds / 1e9, tz=datetime.UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031  # %-formatting is the fastest here
        at.year,
        at.month,
        at.day,
        at.hour,
        at.minute,
        at.second,
        at.microsecond,
    )


def resource(service_name: str, version: str) -> Resource:
    """The resource: OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME as the SDK reads them (from the process
    environment); `service_name` (telemetry.service_name) only where neither names the service."""
    detected = Resource.create({SERVICE_VERSION: version})
    if SERVICE_NAME in OTELResourceDetector().detect().attributes:
        return detected
    return detected.merge(Resource({SERVICE_NAME: service_name}))


def otlp_protocol(env: Mapping[str, str]) -> str | None:
    """The OTLP protocol for traces, or None when OTLP is not configured (no endpoint, or OTEL_TRACES_EXPORTER
    says `none`). ValueError for a protocol this proxy cannot speak: exporting nothing silently is worse."""
    if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    if "none" in {name.strip() for name in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}:
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    ).strip()
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use one of {', '.join(PROTOCOLS)}"
        )
    return protocol


def otlp_exporter(env: Mapping[str, str]) -> SpanExporter | None:
    """The OTLP span exporter the variables select (it reads endpoint, headers, timeout, TLS from them itself)."""
    protocol = otlp_protocol(env)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    return None
