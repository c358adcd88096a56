"""Where spans go, configured the standard way: a JSON-lines file (telemetry.spans_file) and OTLP selected by the
OTEL_* variables (endpoint, protocol grpc or http/protobuf, headers, timeouts), with the resource from
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk import util
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

PROTOCOLS = ("grpc", "http/protobuf")


class JsonLinesExporter(SpanExporter):
    """Writes each finished span as one JSON line: decisions visible without a collector."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._resource: tuple[Resource, dict[str, Any]] | None = None  # the spans' resource, as a dict once

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(self.line(span) + "\n" for span in spans).encode()
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

    def line(self, span: ReadableSpan) -> str:
        """`span` as `ReadableSpan.to_json(indent=None)` writes it, field for field. to_json turns the resource
        (the same for every span) into JSON with an indent, which takes json's pure-Python encoder, and parses it
        back, for each span: a tenth of a screened request's CPU. Here that is done once."""
        if self._resource is None or self._resource[0] is not span.resource:
            self._resource = (span.resource, json.loads(span.resource.to_json()))
        parent = span.parent
        status = {"status_code": str(span.status.status_code.name)}
        if span.status.description:
            status["description"] = span.status.description
        fields = {
            "name": span.name,
            "context": ReadableSpan._format_context(span.context) if span.context else None,
            "kind": str(span.kind),
            "parent_id": f"0x{trace.format_span_id(parent.span_id)}" if parent is not None else None,
            "start_time": util.ns_to_iso_str(span.start_time) if span.start_time else None,
            "end_time": util.ns_to_iso_str(span.end_time) if span.end_time else None,
            "status": status,
            "attributes": ReadableSpan._format_attributes(span.attributes),
            "events": ReadableSpan._format_events(span.events),
            "links": ReadableSpan._format_links(span.links),
            "resource": self._resource[1],
        }
        return json.dumps(fields)


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
