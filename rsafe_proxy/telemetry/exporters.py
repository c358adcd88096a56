"""Where spans go, configured the standard way: a JSON-lines file (telemetry.spans_file) and OTLP selected by the
OTEL_* variables (endpoint, protocol grpc or http/protobuf, headers, timeouts), with the resource from
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

PROTOCOLS = ("grpc", "http/protobuf")


class JsonLinesExporter(SpanExporter):
    """Writes each finished span as one JSON line: decisions visible without a collector."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(span.to_json(indent=None) + "\n" for span in spans).encode()
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
