"""The lighter tracer (rsafe_proxy.telemetry.tracer) against the SDK's own parts: its spans reach the SDK's
processors and exporters as ReadableSpans, validated and bounded as the SDK's spans are, sampled as the
provider's sampler says, and unchangeable once ended."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from rsafe_proxy.telemetry.exporters import JsonLinesExporter
from rsafe_proxy.telemetry.sampling import configured_sampler
from rsafe_proxy.telemetry.tracer import LeanTracer


class Kept(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def _tracer(exporter: SpanExporter, sampler: bool = False) -> LeanTracer:
    provider = TracerProvider(sampler=configured_sampler()) if sampler else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sdk = provider.get_tracer("test", "1")
    assert isinstance(sdk, Tracer)
    return LeanTracer(sdk)


def test_a_span_is_validated_once_it_ends_and_cannot_change_after() -> None:
    kept = Kept()
    span = _tracer(kept).start_span("work", kind=SpanKind.CLIENT, attributes={"a": "x"})
    span.set_attribute("tags", ["one", "two"])
    span.set_attributes({"n": 3, "ok": True})
    span.add_event("seen", {"why": "because", "list": [1, 2]})
    span.end()
    span.set_attribute("late", "ignored")
    span.update_name("renamed")
    span.add_event("late")
    span.end()  # a second end changes nothing and reaches no processor
    [done] = kept.spans
    assert done.name == "work" and done.kind is SpanKind.CLIENT
    assert dict(done.attributes or {}) == {"a": "x", "tags": ("one", "two"), "n": 3, "ok": True}
    assert [event.name for event in done.events] == ["seen"]
    assert dict(done.events[0].attributes or {}) == {"why": "because", "list": (1, 2)}
    assert done.start_time is not None and done.end_time is not None and done.end_time >= done.start_time


def _both(values: dict[str, object]) -> tuple[ReadableSpan, ReadableSpan]:
    """A span with `values` set, ended: the lean tracer's, as its exporter gets it, and the SDK's own."""
    kept = Kept()
    span = _tracer(kept).start_span("work")
    span.set_attributes(values)  # type: ignore[arg-type]
    span.end()
    sdk_span = TracerProvider().get_tracer("sdk").start_span("work")
    sdk_span.set_attributes(values)  # type: ignore[arg-type]
    sdk_span.end()
    assert isinstance(sdk_span, ReadableSpan)
    return kept.spans[0], sdk_span


def test_values_and_limits_are_kept_as_the_sdks_own_span_keeps_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    lean, sdk = _both({"long": "abcdefgh", "mixed": ["a", 1], "none": None, "fine": 1, "tags": ["x", "y"]})
    assert dict(lean.attributes or {}) == dict(sdk.attributes or {})
    assert dict(lean.attributes or {})["long"] == "abcd"


def test_an_empty_list_is_kept_as_the_sdk_keeps_it_without_revalidating_the_span() -> None:
    values = {"rsafe.categories": [], "tags": ["x", "y"], "n": 1, "ok": True}  # a decision with no category
    lean, sdk = _both(values)
    expected = {**values, "rsafe.categories": (), "tags": ("x", "y")}
    assert dict(lean.attributes or {}) == dict(sdk.attributes or {}) == expected
    # every value plain: kept as they are, not validated again by the SDK's BoundedAttributes (twice the CPU)
    assert not isinstance(lean._attributes, BoundedAttributes)


def test_children_share_the_trace_and_name_their_parent() -> None:
    kept = Kept()
    tracer = _tracer(kept)
    with tracer.start_as_current_span("parent") as parent, tracer.start_as_current_span("child") as child:
        assert trace.get_current_span() is child
    by_name = {span.name: span for span in kept.spans}
    parent_context, child_context = parent.get_span_context(), child.get_span_context()
    assert child_context.trace_id == parent_context.trace_id
    assert by_name["child"].parent is not None and by_name["child"].parent.span_id == parent_context.span_id
    assert by_name["parent"].parent is None


def test_an_unsampled_caller_is_recorded_but_not_exported_and_keeps_its_attributes() -> None:
    recorded: list[ReadableSpan] = []

    class Every(SimpleSpanProcessor):  # what the audit log's processor sees: every span, sampled or not
        def on_end(self, span: ReadableSpan) -> None:
            recorded.append(span)

    kept = Kept()
    tracer = _tracer(kept, sampler=True)
    tracer.processor.add_span_processor(Every(kept))
    caller = SpanContext(0x5BF92F3577B34DA6A3CE929D0E0E4736, 0xF067AA0BA902B7, True, TraceFlags(TraceFlags.DEFAULT))
    span = tracer.start_span("screen", trace.set_span_in_context(NonRecordingSpan(caller)), attributes={"k": "v"})
    assert span.is_recording() and not span.get_span_context().trace_flags.sampled
    span.end()
    assert kept.spans == []  # the exporter skips it
    assert [dict(span.attributes or {}) for span in recorded] == [{"k": "v"}]


def test_status_and_exceptions_are_recorded_as_the_sdk_records_them() -> None:
    kept = Kept()
    span = _tracer(kept).start_span("work")
    span.set_status(StatusCode.ERROR, "broke")
    try:
        raise ValueError("bad value")
    except ValueError as error:
        span.record_exception(error)
    span.set_status(StatusCode.UNSET)  # ignored
    span.end()
    [done] = kept.spans
    assert (done.status.status_code, done.status.description) == (StatusCode.ERROR, "broke")
    [event] = done.events
    attributes = dict(event.attributes or {})
    assert event.name == "exception" and attributes["exception.type"] == "ValueError"
    assert attributes["exception.message"] == "bad value" and "Traceback" in str(attributes["exception.stacktrace"])
    ok = _tracer(kept).start_span("ok")
    ok.set_status(Status(StatusCode.OK))
    ok.set_status(StatusCode.ERROR)  # OK is final
    ok.end()
    assert kept.spans[-1].status.status_code is StatusCode.OK


def test_its_spans_encode_for_otlp_and_the_spans_file(tmp_path: Path) -> None:
    kept = Kept()
    span = _tracer(kept).start_span("work", attributes={"tags": ["a"], "n": 1})
    span.add_event("seen", {"why": "x"})
    span.end()
    encoded = encode_spans(kept.spans)
    [scope] = encoded.resource_spans[0].scope_spans
    assert scope.spans[0].name == "work" and scope.spans[0].events[0].name == "seen"
    exporter = JsonLinesExporter(str(tmp_path / "spans.jsonl"))
    exporter.export(kept.spans)
    exporter.shutdown()
    line = json.loads((tmp_path / "spans.jsonl").read_text().splitlines()[0])
    assert line["name"] == "work" and line["attributes"]["tags"] == ["a"]
