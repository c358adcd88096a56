"""Spans and metrics behind one small recorder: a span per request, a child per screen, client spans per
upstream and guard call (OpenTelemetry GenAI conventions plus `rsafe.*`), and Prometheus metrics."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rsafe_proxy.config import TelemetrySettings
from rsafe_proxy.guard.screen import Verdict
from rsafe_proxy.policy.decide import Decision
from rsafe_proxy.policy.schema import Policy


class JsonLinesExporter(SpanExporter):
    """Writes each finished span as one JSON line: decisions visible without a collector."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [span.to_json(indent=None) + "\n" for span in spans]
        try:
            with self._lock, open(self._path, "a", encoding="utf-8") as file:
                file.writelines(lines)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


class Metrics:
    """The proxy's Prometheus metrics, in a registry of its own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "rsafe_decisions", "Screening decisions", ["tenant", "side", "outcome"], registry=self.registry
        )
        self.guard_seconds = Histogram(
            "rsafe_guard_seconds",
            "Guard call latency",
            ["engine", "side"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.overhead_seconds = Histogram(
            "rsafe_overhead_seconds",
            "Time the proxy added to a request",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        )
        self.cache_hits = Counter("rsafe_verdict_cache_hits", "Verdicts served from the cache", registry=self.registry)
        self.cache_misses = Counter("rsafe_verdict_cache_misses", "Verdicts not in the cache", registry=self.registry)
        self.policy_reload_errors = Counter(
            "rsafe_policy_reload_errors", "Policy edits rejected as invalid", registry=self.registry
        )
        self.guard_ready = Gauge("rsafe_guard_ready", "1 when the guard can serve verdicts", registry=self.registry)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class Recorder:
    """Everything the pipeline records goes through here."""

    def __init__(self, settings: TelemetrySettings, base_dir: str = ".") -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
        if settings.spans_file:
            path = (
                settings.spans_file
                if os.path.isabs(settings.spans_file)
                else os.path.join(base_dir, settings.spans_file)
            )
            self.provider.add_span_processor(BatchSpanProcessor(JsonLinesExporter(path), schedule_delay_millis=500))
            self.spans_file: str | None = path
        else:
            self.spans_file = None
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer: Tracer = self.provider.get_tracer("rsafe_proxy")
        self.metrics = Metrics()

    @contextmanager
    def span(
        self,
        name: str,
        attributes: dict[str, Any] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        parent: Context | None = None,
    ) -> Iterator[Span]:
        """A span, child of `parent` (default: the current span); an exception marks it as an error."""
        attributes = _clean(attributes or {})
        with self.tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes) as span:
            yield span

    def screen(
        self, span: Span, tenant: str, policy: Policy, verdict: Verdict, decision: Decision, engine: str
    ) -> None:
        """Record one screening decision on its span and in the metrics."""
        span.set_attributes(
            _clean(
                {
                    "rsafe.tenant": tenant,
                    "rsafe.policy.id": policy.id,
                    "rsafe.policy.version": policy.version,
                    "rsafe.side": decision.side.value,
                    "rsafe.verdict": verdict.label.value,
                    "rsafe.categories": list(decision.categories),
                    "rsafe.action": decision.outcome.value,
                    "rsafe.engine": engine,
                    "rsafe.guard.cached": verdict.cached,
                    "rsafe.guard.latency_ms": round(verdict.seconds * 1000, 2),
                    "rsafe.guard.unsafe_probability": verdict.unsafe_probability,
                    "gen_ai.usage.input_tokens": verdict.prompt_tokens,
                    "gen_ai.usage.output_tokens": verdict.completion_tokens,
                    "rsafe.guard.cached_tokens": verdict.cached_tokens,
                    "rsafe.guard.error": verdict.error,
                }
            )
        )
        if policy.reasoning.capture and verdict.reasoning:
            span.add_event("rsafe.reasoning", {"rsafe.reasoning": verdict.reasoning[:16_000]})
        if verdict.error:
            span.set_status(Status(StatusCode.ERROR, verdict.error))
        self.metrics.decisions.labels(tenant, decision.side.value, decision.outcome.value).inc()
        if verdict.cached:
            self.metrics.cache_hits.inc()
        else:
            self.metrics.cache_misses.inc()
            self.metrics.guard_seconds.labels(engine, decision.side.value).observe(verdict.seconds)

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        self.provider.shutdown()


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attributes.items() if value is not None}


def read_decisions(path: str) -> Iterator[dict[str, Any]]:
    """The screening decisions recorded in a spans file, oldest first."""
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                span = json.loads(line)
            except ValueError:
                continue
            if span.get("name") == "rsafe.screen":
                yield span
