"""A lighter tracer for the proxy's hot path, on the OpenTelemetry SDK's own parts: its sampler, id generator,
resource, span limits and span processors (so every exporter, the audit log and the decision log work as before).

Why: a request makes two to five spans, and the SDK's span took about a fifth of the proxy's CPU on a
pass-through request (benchmarks/README.md): every attribute set takes a lock and is validated on the spot, and
the finished span is copied for the processors. A `LeanSpan` keeps its attributes in a plain dict while it
runs (it lives on one event loop), validates and bounds them once, when it ends (the SDK's BoundedAttributes,
only where a value is not a plain str/bool/int/float or a limit is set), and is itself the ReadableSpan the
processors get: nothing can change it after `end`."""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from time import time_ns
from typing import Any, cast

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

_PLAIN = frozenset({str, bool, int, float})
_SEQUENCES = frozenset({list, tuple})
_UNSET = Status(StatusCode.UNSET)


def _uniform(values: list[Any] | tuple[Any, ...]) -> bool:
    """Whether a sequence is a valid attribute value as it is: empty, or every item of one plain type."""
    if not values:
        return True
    first = type(values[0])
    return first in _PLAIN and all(type(item) is first for item in values)


def _finished(attributes: dict[str, Any], count: int | None, length: int | None) -> Mapping[str, Any]:
    """`attributes` validated and bounded as the SDK would: at once where every value is plain (or a list of
    one plain type, or empty, made a tuple) and no limit bites; by the SDK's BoundedAttributes otherwise."""
    if length is None and (count is None or len(attributes) <= count):
        plain = True
        for key, value in attributes.items():
            if type(value) in _PLAIN:
                continue
            if type(value) in _SEQUENCES and _uniform(value):
                attributes[key] = tuple(value)
                continue
            plain = False
            break
        if plain:
            return attributes
    return BoundedAttributes(count, attributes, immutable=True, max_value_len=length)


class LeanSpan(trace_api.Span, ReadableSpan):
    """A recording span (see the module's docstring); use it from the thread that made it."""

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: types.Attributes,
        tracer: LeanTracer,
    ) -> None:
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes: Any = dict(attributes) if attributes else {}
        self._events: list[Event] = []
        self._links: list[Link] = []
        self._status = _UNSET
        self._resource = tracer.resource
        self._instrumentation_scope = tracer.instrumentation_scope
        self._instrumentation_info = None
        self._start_time: int | None = time_ns()
        self._end_time: int | None = None
        self._tracer = tracer

    def get_span_context(self) -> SpanContext:
        return cast(SpanContext, self._context)  # set from a SpanContext; ReadableSpan types it optional

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end_time is None:
            self._attributes.update(attributes)

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is None:
            self._attributes[key] = value

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            limits = self._tracer.limits
            kept = (
                _finished(dict(attributes), limits.max_event_attributes, limits.max_attribute_length)
                if attributes
                else None
            )
            self._events.append(Event(name, kept, timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is None and context.is_valid:
            self._links.append(Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK's: OK is final, UNSET is ignored, a Status object's own description wins."""
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """The `exception` event of the semantic conventions, as the SDK records it."""
        module, qualname = type(exception).__module__, type(exception).__qualname__
        recorded: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time_ns()
        limits = self._tracer.limits
        self._attributes = _finished(self._attributes, limits.max_span_attributes, limits.max_span_attribute_length)
        self._tracer.processor.on_end(self)


class LeanTracer(trace_api.Tracer):
    """Makes LeanSpans with the parts of `sdk`, an SDK tracer (its provider's sampler, ids, resource, limits and
    processors)."""

    def __init__(self, sdk: SdkTracer) -> None:
        self.sampler = sdk.sampler
        self.ids = sdk.id_generator
        self.processor = sdk.span_processor
        self.resource = sdk.resource
        self.instrumentation_scope = sdk._instrumentation_scope  # the SDK keeps these two private
        self.limits: SpanLimits = sdk._span_limits

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        """A span, child of the span in `context` (the current one by default), sampled as the SDK would."""
        parent: SpanContext | None = trace_api.get_current_span(context).get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = self.ids.generate_trace_id()
            random_id = self.ids.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
        sampled = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
        flags = TraceFlags.SAMPLED if sampled.decision is Decision.RECORD_AND_SAMPLE else TraceFlags.DEFAULT
        if random_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id,
            self.ids.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=sampled.trace_state,
        )
        if sampled.decision is Decision.DROP:
            return trace_api.NonRecordingSpan(span_context)
        span = LeanSpan(name, span_context, parent, kind, sampled.attributes, self)
        if start_time is not None:
            span._start_time = start_time
        for link in links or ():
            span.add_link(link.context, link.attributes)
        # no on_start: the processors here (batch export, audit, decision log) act only on a span's end, and
        # the SDK's signature wants its own mutable Span there
        return span

    @contextmanager  # the API types it as its private context manager class, which behaves as this one
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace_api.Span]:
        """start_span, current inside the block (and ended after it, as `end_on_exit` says)."""
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace_api.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current
