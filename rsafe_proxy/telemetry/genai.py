"""OpenTelemetry GenAI semantic conventions (semconv 1.44.0, GenAI status: development) for the proxy's two model
calls: the guard call (a wrapper around any GuardEngine, so a verdict from the cache makes no span) and the upstream
call (attributes read from the answer it sends, whole or streamed); and the `gen_ai.evaluation.result` event."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager
from contextvars import Token
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import Histogram

from rsafe_proxy.guard.engine import GuardEngine, GuardEngineError, GuardOutput, Sampling
from rsafe_proxy.telemetry.context import waiting

if TYPE_CHECKING:  # a type only: at run time telemetry/ imports no dialect (apis/ reaches telemetry/ through
    # policy/, paths and middleware, so a run-time import would close a package cycle)
    from rsafe_proxy.apis.dialect import AnswerFacts

EVALUATION_EVENT = "gen_ai.evaluation.result"
EVALUATION_NAME = "rsafe.safety"


def server_attributes(url: str) -> dict[str, Any]:
    """`server.address` (the host alone) and `server.port` of `url` (the scheme's default port when none)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return {}
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return {"server.address": parts.hostname, "server.port": port}


def client_attributes(operation: str, provider: str, model: str | None, url: str) -> dict[str, Any]:
    """The attributes a GenAI client span has from its start."""
    attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider}
    if model:
        attributes["gen_ai.request.model"] = model
    return {**attributes, **server_attributes(url)}


def span_name(operation: str, model: str | None) -> str:
    """`{gen_ai.operation.name} {gen_ai.request.model}`, the operation alone when the model is unknown."""
    return f"{operation} {model}" if model else operation


def fail(span: Span, error_type: str, description: str | None = None) -> None:
    """Mark a span as failed the conventions' way: `error.type` and status ERROR (no stack trace)."""
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, description))


@dataclass
class AnswerReading:
    """What a GenAI answer (or the events of a streamed one) says about itself: model, id, usage, finish reasons."""

    model: str | None = None
    response_id: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reasons: tuple[str, ...] = ()

    def read(self, facts: AnswerFacts) -> None:
        """Take what one answer, chunk or event told (its dialect reads it: see Dialect.facts)."""
        self.model = facts.model if facts.model is not None else self.model
        self.response_id = facts.response_id if facts.response_id is not None else self.response_id
        self.input_tokens = facts.input_tokens if facts.input_tokens is not None else self.input_tokens
        self.output_tokens = facts.output_tokens if facts.output_tokens is not None else self.output_tokens
        self.finish_reasons = (*self.finish_reasons, *facts.finish_reasons)

    def attributes(self) -> dict[str, Any]:
        """The response attributes of the span."""
        values = {
            "gen_ai.response.model": self.model,
            "gen_ai.response.id": self.response_id,
            "gen_ai.usage.input_tokens": self.input_tokens,
            "gen_ai.usage.output_tokens": self.output_tokens,
            "gen_ai.response.finish_reasons": list(self.finish_reasons) or None,
        }
        return {key: value for key, value in values.items() if value is not None}


@dataclass
class UpstreamCall:
    """One upstream call's client span, from the request sent to the answer read (a stream: to its end), and its
    latency in rsafe_upstream_seconds. `done` ends it, once.

    `with call:` makes the span current and counts the block as waiting; an error in the block ends the call at
    once (its own context manager: the generator-based ones it replaces cost more than the work, every call)."""

    span: Span
    operation: str
    started: float
    seconds: Histogram
    status: int | None = None
    ended: bool = False
    _token: Token[Context] | None = field(default=None, init=False, repr=False)
    _waiting: AbstractContextManager[None] | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> UpstreamCall:
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        self._waiting = waiting()
        self._waiting.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            if error is not None:
                self.done(error=error)
        finally:
            if self._waiting is not None:
                self._waiting.__exit__(None, None, None)
            if self._token is not None:
                otel_context.detach(self._token)

    def answered(self, status: int) -> None:
        """The response head arrived with `status`."""
        self.status = status
        self.span.set_attribute("http.response.status_code", status)
        if status >= 400:
            fail(self.span, str(status))

    def done(self, reading: AnswerReading | None = None, error: BaseException | None = None) -> None:
        """End the span with what the answer said, or why it failed (a cancelled call was discarded: no error)."""
        if self.ended:
            return
        self.ended = True
        if reading is not None:
            self.span.set_attributes(reading.attributes())
        if isinstance(error, asyncio.CancelledError):
            self.span.set_attribute("rsafe.upstream.discarded", True)
        elif error is not None:
            code = getattr(error, "code", None)
            fail(self.span, code if isinstance(code, str) else type(error).__qualname__)
        status = str(self.status) if self.status is not None else "none"
        self.seconds.labels(self.operation, status).observe(time.perf_counter() - self.started)
        self.span.end()


def _finish(output: GuardOutput) -> str:
    return "length" if output.truncated else "stop"


class TracedEngine:
    """A GuardEngine whose every call is a GenAI client span (`chat {model}`) and counts as waiting: the spans
    are only made for calls really sent, so a verdict read from the cache leaves none."""

    def __init__(self, engine: GuardEngine, tracer: Tracer, provider: str, model: str | None, url: str) -> None:
        self.engine = engine
        self.name = engine.name
        self._tracer = tracer
        self._attributes = client_attributes("chat", provider, model, url)
        self._span_name = span_name("chat", model)

    async def complete(
        self, prompt: str, sampling: Sampling, system: str | None = None, *, cache_salt: str = "", requester: str = ""
    ) -> GuardOutput:
        """The wrapped engine's output, inside a client span (the current context goes to the guard server)."""
        attributes = {
            **self._attributes,
            "gen_ai.request.max_tokens": sampling.max_tokens,
            "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.request.top_p": sampling.top_p,
            "rsafe.engine": self.name,
        }
        with (
            self._tracer.start_as_current_span(
                self._span_name,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            waiting(),
        ):
            try:
                output = await self.engine.complete(
                    prompt, sampling, system, cache_salt=cache_salt, requester=requester
                )
            except GuardEngineError as error:
                fail(span, type(error).__name__, str(error)[:200])
                raise
            reading = AnswerReading(
                model=output.model,
                input_tokens=output.prompt_tokens,
                output_tokens=output.completion_tokens,
                # score mode decodes nothing: no finish reason
                finish_reasons=() if output.unsafe_probability is not None else (_finish(output),),
            )
            span.set_attributes(reading.attributes())
            if output.cached_tokens:
                span.set_attribute("gen_ai.usage.cache_read.input_tokens", output.cached_tokens)
            return output

    async def ready(self) -> bool:
        """The wrapped engine's readiness."""
        return await self.engine.ready()

    async def aclose(self) -> None:
        """Close the wrapped engine."""
        await self.engine.aclose()
