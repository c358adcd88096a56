"""Sampling decides what is exported, never what is recorded: every span reaches the audit log and the decision
log (span processors that ignore sampling), whatever a caller's trace flags or an operator's OTEL_TRACES_SAMPLER
say. Without it a client could keep its requests out of the audit log by sending a `traceparent` flagged
unsampled (`-00`), and a ratio sampler set for export costs would drop audit records with the spans."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes


class RecordAlways(Sampler):
    """`root`'s decision, except that a span it drops is still recorded (RECORD_ONLY: processors see it,
    exporters skip it). The SDK has the same as AlwaysRecordSampler from 1.4x; written here to keep the SDK floor."""

    def __init__(self, root: Sampler) -> None:
        self.root = root

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        result = self.root.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        if result.decision is Decision.DROP:  # a drop carries no attributes: the span's own are kept
            return SamplingResult(Decision.RECORD_ONLY, attributes, result.trace_state)
        return result

    def get_description(self) -> str:
        return f"RecordAlways{{{self.root.get_description()}}}"


def configured_sampler() -> Sampler:
    """The sampler the OTEL_TRACES_SAMPLER variables name (the SDK's default, parent-based always-on, where unset),
    recording every span."""
    return RecordAlways(TracerProvider(shutdown_on_exit=False).sampler)
