"""Exporters the standard way: OTLP over gRPC and over HTTP (chosen by OTEL_EXPORTER_OTLP_PROTOCOL) to receivers on
loopback that decode the protobuf, and the resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk import util
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rsafe_proxy.config import Settings
from rsafe_proxy.telemetry.exporters import JsonLinesExporter, iso_time, otlp_protocol, resource
from tests.doubles import ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Servers, proxy_config, run_proxy

Export = trace_service_pb2.ExportTraceServiceRequest


class Received:
    """What a receiver was sent, decoded."""

    def __init__(self) -> None:
        self.requests: list[Export] = []
        self.lock = threading.Lock()

    def add(self, request: Export) -> None:
        with self.lock:
            self.requests.append(request)

    def services(self) -> set[str]:
        return {
            attribute.value.string_value
            for request in self.requests
            for spans in request.resource_spans
            for attribute in spans.resource.attributes
            if attribute.key == "service.name"
        }

    def resource_attribute(self, key: str) -> set[str]:
        return {
            attribute.value.string_value
            for request in self.requests
            for spans in request.resource_spans
            for attribute in spans.resource.attributes
            if attribute.key == key
        }

    def span_names(self) -> set[str]:
        return {
            span.name
            for request in self.requests
            for spans in request.resource_spans
            for scope in spans.scope_spans
            for span in scope.spans
        }


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    def Export(self, request: Export, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self.received.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(received), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None)


def http_receiver(servers: Servers) -> tuple[str, Received]:
    received = Received()

    async def traces(request: Request) -> Response:
        message = Export()
        message.ParseFromString(await request.body())
        received.add(message)
        return Response(trace_service_pb2.ExportTraceServiceResponse().SerializeToString(), 200)

    app = Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])
    return servers.start(app, lifespan="off").url, received


def serve_one_request(upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path) -> None:
    settings = Settings.model_validate(proxy_config(upstream.url, guard.url, tmp_path))
    with run_proxy(settings) as proxy, proxy.http() as http:
        payload = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
        assert http.post("/v1/chat/completions", json=payload).status_code == 200
    # the proxy has stopped: its lifespan flushed the exporters


def test_spans_go_over_otlp_grpc_with_the_standard_resource(
    grpc_receiver: tuple[str, Received],
    upstream: FakeUpstream,
    guard: ScriptedGuard,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, received = grpc_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=prod")
    serve_one_request(upstream, guard, tmp_path)
    assert received.services() == {"gateway-eu"}  # not telemetry.service_name
    assert received.resource_attribute("deployment.environment.name") == {"prod"}
    assert {"POST /v1/chat/completions", "rsafe.screen", "chat fake-model"} <= received.span_names()


def test_spans_go_over_otlp_http_protobuf(
    servers: Servers, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, received = http_receiver(servers)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")  # the traces-specific variable wins
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    serve_one_request(upstream, guard, tmp_path)
    assert received.services() == {"rsafe-proxy"}  # telemetry.service_name, as the environment names none
    assert {"POST /v1/chat/completions", "chat scripted-guard"} <= received.span_names()


def test_the_resource_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes,team=safety")
    found = resource("configured", "1.2.3").attributes
    assert (found["service.name"], found["team"], found["service.version"]) == ("from-attributes", "safety", "1.2.3")
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    assert resource("configured", "1").attributes["service.name"] == "configured"


@pytest.mark.parametrize(
    ("env", "protocol"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_TRACES_EXPORTER": "none"}, None),
    ],
)
def test_the_protocol_follows_the_standard_variables(env: dict[str, str], protocol: str | None) -> None:
    assert otlp_protocol(env) == protocol


def test_a_protocol_the_proxy_cannot_speak_is_refused_not_ignored() -> None:
    with pytest.raises(ValueError, match="http/json"):
        otlp_protocol({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_the_spans_file_holds_each_span_as_the_sdk_writes_it(tmp_path: Path) -> None:
    # the exporter builds each line itself (the resource turned into JSON once, not once a span): the lines must
    # stay what ReadableSpan.to_json writes, field for field, whatever the span holds
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider(resource=resource("rsafe-proxy", "1.2.3"))
    exporter = JsonLinesExporter(str(path))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    finished: list[ReadableSpan] = []
    provider.add_span_processor(_Collect(finished))
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as parent:
        parent.set_attribute("rsafe.tenant", "bank")
        parent.set_attribute("rsafe.score", 0.1 + 0.2)
        parent.set_attribute("rsafe.count", 2**70)  # past 64 bits: orjson refuses it, json writes it
        with tracer.start_as_current_span("child", links=[Link(parent.get_span_context(), {"why": "x"})]) as child:
            child.add_event("verdict", {"rsafe.verdict": "unsafe", "list": ["a", "b"]})
            child.add_event("excerpt", {"rsafe.excerpt": "half a pair \ud83d, é and 😀"})  # a lone surrogate too
            child.set_status(Status(StatusCode.ERROR, "the guard said no"))
    provider.shutdown()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["child", "parent"]
    assert lines == [json.loads(span.to_json()) for span in finished]
    assert lines[0]["parent_id"] is not None and lines[0]["status"]["description"] == "the guard said no"
    assert lines[1]["resource"]["attributes"]["service.version"] == "1.2.3"


class _Collect(SpanProcessor):
    def __init__(self, into: list[ReadableSpan]) -> None:
        self.into = into

    def on_end(self, span: ReadableSpan) -> None:
        self.into.append(span)


@pytest.mark.parametrize("nanoseconds", [1, 999_999_999, 1_764_700_000_000_000_500, 1_764_700_000_999_999_500, 2**62])
def test_span_times_are_written_as_the_sdk_writes_them(nanoseconds: int) -> None:
    # the same rounding to microseconds, at the edges of a second too
    assert iso_time(nanoseconds) == util.ns_to_iso_str(nanoseconds)
