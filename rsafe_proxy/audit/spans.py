"""Where audit records come from: the `rsafe.screen` span of each decision (telemetry.Recorder.screen sets its
attributes), read as the span ends, as the decision log line is (logs.DecisionLog).

The guard's reasoning is read from the span's `rsafe.reasoning` event, which the recorder adds only where the
policy captures reasoning (`reasoning.capture`), so the audit log keeps that rule. Content is never on a span:
no excerpt comes from here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import format_trace_id

from rsafe_proxy.audit.record import DecisionRecord

SCREEN_SPAN = "rsafe.screen"


def decision_record(span: ReadableSpan) -> DecisionRecord | None:
    """The decision `span` records, or None when it is no finished screen (no action was decided)."""
    if span.name != SCREEN_SPAN:
        return None
    attributes: Mapping[str, Any] = span.attributes or {}
    action = attributes.get("rsafe.action")
    context = span.get_span_context()
    if not isinstance(action, str) or context is None:
        return None
    named = attributes.get("rsafe.categories")
    categories = tuple(str(category) for category in named) if isinstance(named, list | tuple) else ()
    score = attributes.get("rsafe.guard.unsafe_probability")
    started, ended = span.start_time or 0, span.end_time or span.start_time or 0
    reasoning = next(
        (
            str((event.attributes or {}).get("rsafe.reasoning", ""))
            for event in span.events
            if event.name == "rsafe.reasoning"
        ),
        None,
    )
    return DecisionRecord(
        decision_id=format_trace_id(context.trace_id),
        seq=int(attributes.get("rsafe.seq", 0)),
        time=ended / 1e9,
        tenant=str(attributes.get("rsafe.tenant", "")),
        route=str(attributes.get("rsafe.route", "")),
        side=str(attributes.get("rsafe.side", "")),
        verdict=str(attributes.get("rsafe.verdict", "unknown")),
        score=float(score) if isinstance(score, int | float) else None,
        categories=categories,
        action=action,
        policy_id=str(attributes.get("rsafe.policy.id", "")),
        policy_version=str(attributes.get("rsafe.policy.version", "")),
        engine=str(attributes.get("rsafe.engine", "")),
        latency_ms=round((ended - started) / 1e6, 3),  # the whole screen, cache lookup and guard call
        cache_hit=bool(attributes.get("rsafe.guard.cached", False)),
        reasoning=reasoning,
    )


class AuditSpans(SpanProcessor):
    """Hands each decision to `submit` (the audit writer's, which never blocks) as its span ends."""

    def __init__(self, submit: Callable[[DecisionRecord], None]) -> None:
        self.submit = submit

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing to do until the decision is known."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue the span's decision, if it is one."""
        record = decision_record(span)
        if record is not None:
            self.submit(record)

    def shutdown(self) -> None:
        """Nothing held: the writer is closed by the runtime."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing buffered here."""
        return True
