"""Traces to the standard: W3C trace context in and out, the decision id on every response, and the spans of each
kind of request (read from an in-memory exporter added to the running proxy's provider) checked against the
OpenTelemetry HTTP and GenAI conventions: names, kinds, parents, attributes, events, status."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from rsafe_proxy.app import build_app
from rsafe_proxy.config import Settings
from rsafe_proxy.runtime import Runtime
from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy, Servers, proxy_config, write_policy

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CHAT = "/v1/chat/completions"


class Traced:
    """A proxy in front of the doubles whose spans are also kept in memory."""

    def __init__(self, proxy: Proxy, exporter: InMemorySpanExporter) -> None:
        self.proxy = proxy
        self.exporter = exporter

    def post(self, text: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
        payload = {"model": "fake-model", "messages": [{"role": "user", "content": text}], **body}
        with self.proxy.http() as http:
            return http.post(CHAT, json=payload, headers=headers or {})

    def trace(self, reply: httpx.Response) -> list[ReadableSpan]:
        """The finished spans of the trace whose id `reply` carries (waiting for its server span to end)."""
        trace_id = int(reply.headers["x-rsafe-decision-id"], 16)
        deadline = time.monotonic() + 5
        while True:
            spans = [span for span in self.exporter.get_finished_spans() if _trace(span) == trace_id]
            if any(span.kind is SpanKind.SERVER for span in spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.01)


def _trace(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    [span] = named(spans, name)
    return span


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def screens(spans: list[ReadableSpan], side: str) -> list[ReadableSpan]:
    return [span for span in named(spans, "rsafe.screen") if attributes(span)["rsafe.side"] == side]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [span for span in spans if span.parent is not None and span.parent.span_id == _id(parent)]


def no_stack_traces(spans: list[ReadableSpan]) -> None:
    assert [event.name for span in spans for event in span.events if event.name == "exception"] == []


MakeTraced = Callable[..., Traced]


@pytest.fixture
def make_traced(servers: Servers, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path) -> MakeTraced:
    def make(**overrides: Any) -> Traced:
        settings = Settings.model_validate(proxy_config(upstream.url, guard.url, tmp_path, **overrides))
        app = build_app(settings)
        served = servers.start(app, settings=settings)
        runtime: Runtime = app.state.runtime  # type: ignore[attr-defined]
        exporter = InMemorySpanExporter()
        runtime.recorder.provider.add_span_processor(SimpleSpanProcessor(exporter))
        return Traced(Proxy(served.url, settings, served), exporter)

    return make


@pytest.fixture
def traced(make_traced: MakeTraced) -> Traced:
    return make_traced()


def with_policy(make_traced: MakeTraced, tmp_path: Path, action: str) -> Traced:
    category = [{"id": "U2", "name": "Weapons & Illegal Tactics", "action": action}]
    policy = write_policy(tmp_path, f"p-{action}", categories=category)
    return make_traced(tenants=[{"id": "default", "anonymous": True, "policy": str(policy)}])


# -- W3C trace context ------------------------------------------------------------------------------------------


def test_a_callers_trace_is_continued_and_the_proxys_own_context_goes_on(
    traced: Traced, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "vendor=1"}
    reply = traced.post("hello", caller)
    assert reply.status_code == 200
    assert reply.headers["x-rsafe-decision-id"] == CALLER_TRACE
    spans = traced.trace(reply)
    server = next(span for span in spans if span.kind is SpanKind.SERVER)
    assert server.parent is not None and format_span_id(server.parent.span_id) == CALLER_SPAN
    assert server.parent.is_remote
    # the upstream's spans hang off the proxy's upstream call, never off the caller's span
    [sent] = upstream.calls(CHAT)
    _, trace_id, parent_id, _ = sent.headers["traceparent"].split("-")
    upstream_call = one(spans, "chat fake-model")
    assert (trace_id, parent_id) == (CALLER_TRACE, format_span_id(_id(upstream_call)))
    assert sent.headers["tracestate"] == "vendor=1"
    guard_calls = named(spans, "chat scripted-guard")
    assert len(guard.traceparents) == len(guard_calls) == 2
    assert {parent.split("-")[2] for parent in guard.traceparents if parent} == {
        format_span_id(_id(span)) for span in guard_calls
    }


def test_without_a_caller_trace_a_new_one_is_started(traced: Traced, upstream: FakeUpstream) -> None:
    reply = traced.post("hello", {"traceparent": "garbage"})
    decision = reply.headers["x-rsafe-decision-id"]
    assert len(decision) == 32 and decision != "0" * 32
    server = next(span for span in traced.trace(reply) if span.kind is SpanKind.SERVER)
    assert server.parent is None
    assert upstream.calls(CHAT)[0].headers["traceparent"].split("-")[1] == decision


# -- a request that passes ------------------------------------------------------------------------------------


def test_a_passed_request_is_a_server_span_over_screens_and_genai_client_calls(traced: Traced) -> None:
    reply = traced.post("hello")
    assert reply.status_code == 200
    spans = traced.trace(reply)
    server = one(spans, "POST /v1/chat/completions")
    assert server.kind is SpanKind.SERVER and server.status.status_code is StatusCode.UNSET
    assert attributes(server) | {"client.address": "-", "network.protocol.version": "-"} == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "url.path": "/v1/chat/completions",
        "url.scheme": "http",
        "user_agent.original": attributes(server)["user_agent.original"],
        "client.address": "-",
        "network.protocol.version": "-",
        "rsafe.tenant": "default",
        "rsafe.policy.id": "rsafe-default",
        "rsafe.policy.version": attributes(server)["rsafe.policy.version"],
        "rsafe.request.model": "fake-model",
        "rsafe.request.kind": "chat",
    }
    # one span per request: the server span is the screened request's, its screens and upstream call its children
    assert not named(spans, "rsafe.request")
    request = server
    assert {span.name for span in children(spans, request)} == {"rsafe.screen", "chat fake-model"}

    upstream_call = one(spans, "chat fake-model")
    assert upstream_call.kind is SpanKind.CLIENT
    got = attributes(upstream_call)
    assert got["gen_ai.operation.name"] == "chat" and got["gen_ai.provider.name"] == "openai"
    assert got["gen_ai.request.model"] == got["gen_ai.response.model"] == "fake-model"
    assert got["gen_ai.response.finish_reasons"] == ("stop",)
    assert got["server.address"] == "127.0.0.1" and isinstance(got["server.port"], int)
    assert got["http.response.status_code"] == 200
    assert "gen_ai.system" not in got and "error.type" not in got

    for side in ("input", "output"):
        [screen] = screens(spans, side)
        assert screen.parent is not None and screen.parent.span_id == _id(request)
        assert attributes(screen)["rsafe.verdict"] == "safe" and attributes(screen)["rsafe.action"] == "allow"
        [call] = children(spans, screen)
        assert call.name == "chat scripted-guard" and call.kind is SpanKind.CLIENT
        guard_attributes = attributes(call)
        assert guard_attributes["gen_ai.usage.input_tokens"] == 300
        assert guard_attributes["gen_ai.usage.output_tokens"] == 20
        assert guard_attributes["gen_ai.response.model"] == "scripted-guard"
        assert guard_attributes["gen_ai.response.finish_reasons"] == ("stop",)
        assert guard_attributes["gen_ai.provider.name"] == "openai"
        assert guard_attributes["server.address"] == "127.0.0.1"
        assert "gen_ai.system" not in guard_attributes
        [evaluation] = [event for event in screen.events if event.name == "gen_ai.evaluation.result"]
        assert dict(evaluation.attributes or {})["gen_ai.evaluation.name"] == "rsafe.safety"
        assert dict(evaluation.attributes or {})["gen_ai.evaluation.score.label"] == "safe"
    no_stack_traces(spans)


# -- blocks, rewrites, flags ------------------------------------------------------------------------------------


def test_an_input_block_is_an_outcome_not_an_error(traced: Traced, upstream: FakeUpstream) -> None:
    reply = traced.post(f"{UNSAFE} now")
    assert reply.status_code == 400
    decision = reply.headers["x-rsafe-decision-id"]
    assert reply.json()["error"]["decision_id"] == decision
    spans = traced.trace(reply)
    assert format_trace_id(_trace(spans[0])) == decision
    server = one(spans, "POST /v1/chat/completions")
    assert server.status.status_code is StatusCode.UNSET and "error.type" not in attributes(server)
    assert attributes(server)["http.response.status_code"] == 400
    assert attributes(server)["rsafe.error.code"] == "content_filter"
    [screen] = screens(spans, "input")
    assert attributes(screen)["rsafe.action"] == "block" and attributes(screen)["rsafe.categories"] == ("U2",)
    [evaluation] = [event for event in screen.events if event.name == "gen_ai.evaluation.result"]
    assert dict(evaluation.attributes or {})["gen_ai.evaluation.score.label"] == "unsafe"
    explanation = dict(evaluation.attributes or {}).get("gen_ai.evaluation.explanation")
    assert isinstance(explanation, str) and UNSAFE in explanation  # the default policy captures reasoning
    no_stack_traces(spans)


@pytest.mark.parametrize("stream", [False, True])
def test_an_output_block_is_recorded_on_the_output_screen(traced: Traced, stream: bool) -> None:
    reply = traced.post(f"please {ASK_UNSAFE_ANSWER}", stream=stream)
    assert reply.status_code == 200 and len(reply.headers["x-rsafe-decision-id"]) == 32
    spans = traced.trace(reply)
    blocked = [span for span in screens(spans, "output") if attributes(span)["rsafe.action"] == "block"]
    assert blocked and attributes(blocked[0])["rsafe.verdict"] == "unsafe"
    upstream_call = one(spans, "chat fake-model")
    assert upstream_call.kind is SpanKind.CLIENT
    assert attributes(upstream_call)["gen_ai.response.model"] == "fake-model"
    server = next(span for span in spans if span.kind is SpanKind.SERVER)
    assert server.end_time is not None and upstream_call.end_time is not None
    assert server.end_time >= upstream_call.end_time  # the server span lasts as long as the stream
    no_stack_traces(spans)


@pytest.mark.parametrize("action", ["rewrite", "flag"])
def test_a_rewrite_or_a_flag_is_recorded_as_its_action(make_traced: MakeTraced, tmp_path: Path, action: str) -> None:
    traced = with_policy(make_traced, tmp_path, action)
    reply = traced.post(f"{UNSAFE} now")
    assert reply.status_code == 200
    spans = traced.trace(reply)
    [screen] = screens(spans, "input")
    assert attributes(screen)["rsafe.action"] == action
    assert attributes(screen)["rsafe.verdict"] == "unsafe"
    assert screen.status.status_code is StatusCode.UNSET
    assert len(named(spans, "chat fake-model")) >= 1


# -- the cache, the guard failing -------------------------------------------------------------------------------


def test_a_cached_verdict_is_a_decision_span_without_a_guard_call(traced: Traced) -> None:
    first = traced.post("hello there")
    assert first.status_code == 200
    traced.trace(first)
    again = traced.post("hello there")
    spans = traced.trace(again)
    [screen] = screens(spans, "input")
    assert attributes(screen)["rsafe.guard.cached"] is True
    assert attributes(screen)["rsafe.action"] == "allow"
    assert children(spans, screen) == []  # no client span for a call never made
    assert [event.name for event in screen.events] == ["gen_ai.evaluation.result"]


def test_a_guard_failure_is_an_error_on_the_guard_call_and_the_server_span(
    traced: Traced, guard: ScriptedGuard
) -> None:
    guard.status = 500
    reply = traced.post("hello")
    assert reply.status_code == 503
    body = reply.json()["error"]
    assert body["code"] == "guard_unavailable"
    assert body["decision_id"] == reply.headers["x-rsafe-decision-id"]
    spans = traced.trace(reply)
    calls = named(spans, "chat scripted-guard")
    assert calls and all(call.status.status_code is StatusCode.ERROR for call in calls)
    assert {attributes(call)["error.type"] for call in calls} == {"GuardEngineError"}
    [screen] = screens(spans, "input")
    assert screen.status.status_code is StatusCode.ERROR and attributes(screen)["error.type"] == "guard_error"
    server = one(spans, "POST /v1/chat/completions")
    assert server.status.status_code is StatusCode.ERROR
    assert attributes(server)["error.type"] == "guard_unavailable"  # the error's code, not only its status
    assert attributes(server)["http.response.status_code"] == 503
    no_stack_traces(spans)


# -- refused before the pipeline --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "content", "headers", "status", "route"),
    [
        ("POST", CHAT, b"{not json", {"content-type": "application/json"}, 400, "/v1/chat/completions"),
        ("GET", "/v1/images/generations", b"", {}, 404, "/v1/{rest:path}"),
        ("GET", "/v1/%2e%2e/chat/completions", b"", {}, 400, None),
        ("POST", CHAT, b"x" * 70_000, {"content-type": "application/json"}, 413, None),
    ],
)
def test_every_refused_request_has_a_server_span_and_a_decision_id(
    traced: Traced, method: str, path: str, content: bytes, headers: dict[str, str], status: int, route: str | None
) -> None:
    with traced.proxy.http() as http:
        reply = http.request(method, path, content=content, headers=headers)
    assert reply.status_code == status
    decision = reply.headers["x-rsafe-decision-id"]
    assert reply.json()["error"]["decision_id"] == decision
    [server] = [span for span in traced.trace(reply) if span.kind is SpanKind.SERVER]
    assert attributes(server)["http.response.status_code"] == status
    assert server.name == (f"{method} {route}" if route else method)
    assert attributes(server).get("http.route") == route


def test_an_unknown_key_is_refused_with_a_trace(make_traced: MakeTraced) -> None:
    key = "sha256:" + hashlib.sha256(b"sk-acme").hexdigest()
    traced = make_traced(tenants=[{"id": "acme", "keys": [key], "policy": "rsafe-default"}])
    reply = traced.post("hello", {"authorization": "Bearer sk-wrong"})
    assert reply.status_code == 401
    assert reply.json()["error"]["decision_id"] == reply.headers["x-rsafe-decision-id"]
    [server] = [span for span in traced.trace(reply) if span.kind is SpanKind.SERVER]
    assert attributes(server)["http.response.status_code"] == 401
    assert server.status.status_code is StatusCode.UNSET


def test_the_upstreams_own_decision_headers_never_reach_the_client(traced: Traced, upstream: FakeUpstream) -> None:
    reply = traced.post("hello")
    assert reply.headers.get_list("x-rsafe-decision-id") == [reply.headers["x-rsafe-decision-id"]]
    assert float(reply.headers["x-rsafe-overhead-ms"]) >= 0
