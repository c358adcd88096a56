"""Spans and metrics behind one small recorder: a server span per HTTP request (http.py), a span per screened
request and per screen, GenAI client spans per upstream and guard call (genai.py), `rsafe.*` attributes and the
`gen_ai.evaluation.result` event on every verdict, and Prometheus metrics (metrics.py)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Tracer

from rsafe_proxy.errors import ProxyError
from rsafe_proxy.telemetry.exporters import JsonLinesExporter, otlp_exporter, resource
from rsafe_proxy.telemetry.genai import (
    EVALUATION_EVENT,
    EVALUATION_NAME,
    UpstreamCall,
    client_attributes,
    fail,
    server_attributes,
    span_name,
)
from rsafe_proxy.telemetry.metrics import Metrics, bounded
from rsafe_proxy.telemetry.sampling import configured_sampler
from rsafe_proxy.telemetry.tracer import LeanTracer

if TYPE_CHECKING:  # types only: importing them here would close an import cycle (policy -> paths -> middleware)
    from rsafe_proxy.config import TelemetrySettings
    from rsafe_proxy.guard.screen import Verdict
    from rsafe_proxy.policy.decide import Decision
    from rsafe_proxy.policy.schema import Policy

__all__ = ["JsonLinesExporter", "Metrics", "Recorder", "read_decisions"]

VERSION = "0.1.0"


class Recorder:
    """Everything the pipeline records goes through here."""

    def __init__(self, settings: TelemetrySettings, base_dir: str = ".") -> None:
        self.provider = TracerProvider(resource=resource(settings.service_name, VERSION), sampler=configured_sampler())
        if settings.spans_file:
            path = (
                settings.spans_file
                if os.path.isabs(settings.spans_file)
                else os.path.join(base_dir, settings.spans_file)
            )
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # the state folder may not exist yet
            self.provider.add_span_processor(BatchSpanProcessor(JsonLinesExporter(path), schedule_delay_millis=500))
            self.spans_file: str | None = path
        else:
            self.spans_file = None
        exporter = otlp_exporter(os.environ)
        if exporter is not None:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        sdk_tracer = self.provider.get_tracer("rsafe_proxy", VERSION)
        # (OTEL_SDK_DISABLED=true makes it the API's no-op tracer, kept as it is)
        self.tracer: Tracer = LeanTracer(sdk_tracer) if isinstance(sdk_tracer, SdkTracer) else sdk_tracer
        self.metrics = Metrics()

    @contextmanager
    def span(
        self,
        name: str,
        attributes: dict[str, Any] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        parent: Context | None = None,
    ) -> Iterator[Span]:
        """A span, child of `parent` (default: the current span); an exception ends it as `failed` says."""
        attributes = _clean(attributes or {})
        with self.tracer.start_as_current_span(
            name,
            context=parent,
            kind=kind,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except Exception as error:
                self.failed(span, error)
                raise

    def upstream_call(
        self, operation: str | None, model: str | None, method: str, base_url: str, parent: Context | None
    ) -> UpstreamCall:
        """The client span of one upstream call, to enter (`with`): current, and counted as waiting, inside the
        block: a GenAI span (`chat {model}`) for a generation (`operation` set), else an HTTP client span
        (`{method}`). The caller ends it with `done` once the answer is read; an error in the block ends it at
        once."""
        if operation:
            name, attributes = span_name(operation, model), client_attributes(operation, "openai", model, base_url)
        else:
            name, attributes = method, {"http.request.method": method, **server_attributes(base_url)}
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.CLIENT, attributes=attributes)
        return UpstreamCall(span, operation or "http", time.perf_counter(), self.metrics.upstream_seconds)

    def failed(self, span: Span, error: BaseException) -> None:
        """Record why `span`'s work stopped. A refusal (a policy block, a bad request: any 4xx) is an outcome, not
        a fault: its code goes in `rsafe.error.code` and the status stays unset. A 5xx ProxyError sets
        `error.type` to its code and status ERROR; anything else (a bug) also records the exception."""
        if isinstance(error, ProxyError):
            span.set_attribute("rsafe.error.code", error.code or type(error).__name__)
            if error.status >= 500:
                fail(span, error.code or type(error).__name__, error.message[:200])
            return
        fail(span, type(error).__qualname__)
        span.record_exception(error)

    def screen(
        self, span: Span, tenant: str, policy: Policy, verdict: Verdict, decision: Decision, engine: str
    ) -> None:
        """Record one screening decision on its span (attributes and a `gen_ai.evaluation.result` event) and in
        the metrics."""
        side = decision.side.value
        span.set_attributes(
            _clean(
                {
                    "rsafe.tenant": tenant,
                    "rsafe.policy.id": policy.id,
                    "rsafe.policy.version": policy.version,
                    "rsafe.side": side,
                    "rsafe.verdict": verdict.label.value,
                    "rsafe.categories": list(decision.categories),
                    "rsafe.action": decision.outcome.value,
                    "rsafe.engine": engine,
                    "rsafe.guard.cached": verdict.cached,
                    "rsafe.guard.latency_ms": round(verdict.seconds * 1000, 2),
                    "rsafe.guard.unsafe_probability": verdict.unsafe_probability,
                    "rsafe.guard.input_tokens": verdict.prompt_tokens,
                    "rsafe.guard.output_tokens": verdict.completion_tokens,
                    "rsafe.guard.cached_tokens": verdict.cached_tokens,
                    "rsafe.guard.error": verdict.error,
                }
            )
        )
        event = {
            "gen_ai.evaluation.name": EVALUATION_NAME,
            "gen_ai.evaluation.score.label": verdict.label.value,
            "gen_ai.evaluation.score.value": verdict.unsafe_probability,
            "rsafe.side": side,
            "rsafe.action": decision.outcome.value,
            "error.type": "guard_error" if verdict.error else None,
        }
        if policy.reasoning.capture and verdict.reasoning:
            event["gen_ai.evaluation.explanation"] = verdict.reasoning[:16_000]
            span.add_event("rsafe.reasoning", {"rsafe.reasoning": verdict.reasoning[:16_000]})
        span.add_event(EVALUATION_EVENT, _clean(event))
        if verdict.error:
            fail(span, "guard_error", verdict.error[:200])
        metrics = self.metrics
        category = "none"
        if decision.categories:
            known = frozenset(line.id for line in policy.categories_for(decision.side))
            category = bounded(decision.categories[0], known)
        metrics.decisions.labels(tenant, side, decision.outcome.value).inc()
        metrics.verdicts.labels(tenant, side, verdict.label.value, decision.outcome.value, category).inc()
        if verdict.error:
            metrics.errors.labels("guard_error").inc()
        if verdict.cached:
            metrics.cache_hits.labels(side).inc()
            return
        metrics.cache_misses.labels(side).inc()
        if verdict.seconds:
            metrics.guard_seconds.labels(engine, side).observe(verdict.seconds)
        for kind, count in (
            ("input", verdict.prompt_tokens),
            ("output", verdict.completion_tokens),
            ("cached", verdict.cached_tokens),
        ):
            if count:
                metrics.guard_tokens.labels(engine, side, kind).inc(count)

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
