"""Screen the input, call the upstream, screen the output. Knows no HTTP framework (it returns replies) and no
API's shapes (it asks the dialect the route gives it; the screens themselves are in screens.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span

from rsafe_proxy.apis import CHAT, Dialect, guardrail
from rsafe_proxy.bodies import encode_json, parse_json, read_json
from rsafe_proxy.calls import Call, Reply, StreamReply
from rsafe_proxy.errors import ContentBlocked, ContentTooLong, GuardUnavailable, UpstreamUnavailable
from rsafe_proxy.guard.conversation import Turn
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.guard.screen import Screener
from rsafe_proxy.http_client import Answer
from rsafe_proxy.policy.decide import Decision, Outcome
from rsafe_proxy.screens import Screening, Screens
from rsafe_proxy.streaming import Event, WindowedScreen, sse_events
from rsafe_proxy.telemetry import Recorder
from rsafe_proxy.telemetry.context import waited, waiting
from rsafe_proxy.telemetry.genai import AnswerReading
from rsafe_proxy.tracecontext import inject
from rsafe_proxy.upstream import Upstream, forward_headers, returned_headers


async def _upstream_error(response: Answer) -> bool:
    """True for an upstream error (4xx, 5xx: passed through with its status and body), False for an answer (200).
    Any other status (201, 206, a redirect) is no answer the proxy screens, so it is not passed on either: its
    body could carry generated text, its Location send the client's request past the proxy."""
    if response.status_code >= 400:
        return True
    if response.status_code == 200:
        return False
    await response.aclose()
    raise UpstreamUnavailable(f"The upstream model answered with HTTP {response.status_code}, not with an answer.")


async def _read_events(
    events: AsyncIterator[Event], dialect: Dialect[Any], reading: AnswerReading
) -> AsyncIterator[Event]:
    """`events`, what each says about the answer (model, usage, finish reasons, as `dialect` reads it) taken into
    `reading`."""
    async for event in events:
        reading.read(dialect.facts(event.data))
        yield event


async def _discard(task: asyncio.Task[Answer] | None) -> None:
    """Cancel an upstream call; close its response if it had already arrived."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(BaseException):
        response = await task
        await response.aclose()


def _is_event_stream(response: Answer) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


Discard = Callable[[], Awaitable[None]]


async def _abandon(early: tuple[StreamReply, Discard] | None, upstream: asyncio.Task[Answer] | None) -> None:
    """Drop a streamed answer that will not be released (its windows' reading and guard calls stop first), then
    the upstream call."""
    if early is not None:
        await early[1]()
    await _discard(upstream)


# A passed-through answer no longer than this (by its Content-Length) is read whole (Pipeline.forward).
_WHOLE_ANSWER_BYTES = 64 * 1024


class Pipeline:
    """The screening pipeline for one app: screener, upstream and recorder are injected."""

    def __init__(
        self,
        screener: Screener,
        upstream: Upstream,
        recorder: Recorder,
        engine_name: str,
        parallel: bool = True,
        upstream_api_key: str | None = None,
    ) -> None:
        self.screener = screener
        self.screens = Screens(screener, recorder, engine_name)
        self.upstream = upstream
        self.recorder = recorder
        self.engine_name = engine_name
        self.parallel = parallel
        self.upstream_api_key = upstream_api_key

    # -- the upstream ---------------------------------------------------------------------------------------

    def _authorization(self, call: Call) -> str | None:
        key = call.tenant.upstream_api_key or self.upstream_api_key
        if key:
            return f"Bearer {key}"
        # drop-in mode: the client's own credentials go upstream; a proxy key never does
        return None if call.tenant.keyed else call.headers.get("authorization")

    async def _open(self, state: Screening | None, call: Call, content: bytes | None) -> Answer:
        """Send the call upstream inside its client span, which ends when the answer is read (see _read)."""
        parent = state.context if state else None
        base_url = call.tenant.upstream_base_url or self.upstream.base_url
        model = state.request.model if state is not None and state.request is not None else None
        operation = state.dialect.operation if state and model else None
        with self.recorder.upstream_call(operation, model, call.method, base_url, parent) as upstream_call:
            headers = forward_headers(call.headers, self._authorization(call))
            inject(headers)  # the proxy's own trace context, not the caller's
            if state is not None and content is not None:  # a judged body, re-encoded as JSON
                headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-encoding")}
                headers["content-type"] = "application/json"
            response = await self.upstream.open(
                call.method,
                call.path,
                headers,
                content,
                base_url=call.tenant.upstream_base_url,
                query=call.query,
            )
            upstream_call.answered(response.status_code)
        if state is None:  # passed through: its span ends with the response head
            upstream_call.done()
        else:
            state.opened[id(response)] = upstream_call
        return response

    async def _read(self, state: Screening, response: Answer) -> tuple[bytes, Any]:
        """The whole upstream answer (waited for) and, for a 200, its JSON value, read once (one reading: an
        object whose keys repeat could be judged in one reading and shown in another), else None; its client
        span ends with what the answer says."""
        upstream_call = state.opened.pop(id(response), None)
        try:
            with waiting():
                raw = await Upstream.read(response)
        except Exception as error:
            if upstream_call is not None:
                upstream_call.done(error=error)
            raise
        value = read_json(raw) if response.status_code == 200 else None
        if upstream_call is not None:
            reading = AnswerReading()
            reading.read(state.dialect.facts(value))
            upstream_call.done(reading)
        return raw, value

    def _end(self, state: Screening) -> None:
        """End the spans of the upstream calls the request discarded unread."""
        for upstream_call in state.opened.values():
            upstream_call.span.set_attribute("rsafe.upstream.discarded", True)
            upstream_call.done()
        state.opened.clear()

    async def forward(self, call: Call) -> Reply | StreamReply:
        """Any other /v1 route: passed through unscreened, streamed back as it comes; an answer that says it is
        small (Content-Length up to 64 KiB, not compressed: an embedding, a model list) is read whole and sent in
        one piece, which costs the proxy less than relaying it chunk by chunk (and a break in it is a 502)."""
        response = await self._open(None, call, call.body or None)
        length, coding = response.headers.get("content-length", ""), response.headers.get("content-encoding", "")
        # (a compressed one is relayed: 64 KiB of gzip can decode to far more than is worth holding whole)
        small = length.isdigit() and int(length) <= _WHOLE_ANSWER_BYTES and coding.lower() in ("", "identity")
        if call.method != "HEAD" and small:
            with waiting():
                raw = await Upstream.read(response)
            return Reply(response.status_code, raw, returned_headers(response.headers))

        async def body() -> AsyncIterator[bytes]:
            # a break raises (UpstreamUnavailable, UpstreamTimeout): the client's transfer is then cut, never
            # ended as if the answer were whole (middleware.ErrorBoundary)
            try:
                async for chunk in waited(Upstream.chunks(response)):
                    yield chunk
            finally:
                await response.aclose()

        # closing: a body never iterated (a client gone before its first chunk) still gives its connection back
        return StreamReply(response.status_code, returned_headers(response.headers), body(), closing=response.aclose)

    # -- screened routes ------------------------------------------------------------------------------------

    def _request_span(self, call: Call, attributes: Mapping[str, str] | None = None) -> Span:
        """The span of one screened request: the HTTP server span it is served under (telemetry.http, which ends
        it with the response's last byte), given its tenant, policy and `attributes`. One span per request: its
        screens and upstream calls are its children."""
        span = trace.get_current_span()
        policy = call.policy
        span.set_attributes(
            {
                "rsafe.tenant": call.tenant.id,
                "rsafe.policy.id": policy.id,
                "rsafe.policy.version": policy.version,
                **(attributes or {}),
            }
        )
        return span

    async def complete(self, call: Call, dialect: Dialect[Any]) -> Reply | StreamReply:
        """POST /v1/chat/completions, /v1/completions or /v1/responses (as `dialect` reads them), screened on
        both sides."""
        body = parse_json(call.body)
        validated = dialect.validated(body)
        request = validated.request
        # the upstream gets the body that was judged, re-encoded, never the client's bytes (one reading)
        call = replace(call, body=encode_json(body))
        span = self._request_span(
            call,
            {"rsafe.request.model": request.model, "rsafe.request.kind": dialect.name},
        )
        state = Screening(call, dialect, body, request, validated.turns, validated.prompt, span)
        streamed = False
        try:
            reply = await self._complete(state, bool(request.stream))
            streamed = isinstance(reply, StreamReply)
            return reply
        except Exception as error:
            self.recorder.failed(span, error)  # a policy block is an outcome: no exception, no stack trace
            span.set_attribute("rsafe.error", type(error).__name__)
            raise
        finally:
            if not streamed:
                self._end(state)

    async def _complete(self, state: Screening, stream: bool) -> Reply | StreamReply:
        call = state.call
        upstream: asyncio.Task[Answer] | None = None
        early: tuple[StreamReply, Discard] | None = None
        if self.parallel and not state.dialect.acts_upstream(state.body):
            # started first (tasks run in the order made): the answer's first tokens, which a stream's first
            # window waits for, then start a little sooner; the input's verdict does not wait on them
            upstream = asyncio.create_task(self._open(state, call, call.body))
        screening = asyncio.create_task(self.screens.screen_input(state))
        try:
            if stream and upstream is not None:
                early = await self._early_stream(state, screening, upstream)
            verdict, decision, judged = await screening
        except BaseException:
            screening.cancel()
            await _abandon(early, upstream)
            raise
        content = call.body
        if decision.outcome in (Outcome.BLOCK, Outcome.GUARD_ERROR_BLOCK, Outcome.REWRITE):
            await _abandon(early, upstream)
            early, upstream = None, None
        if decision.outcome is Outcome.BLOCK:
            extra = {"policy": call.policy.id}
            if verdict is not None and call.policy.reasoning.return_to_client:
                extra["reasoning"] = verdict.reasoning
            raise ContentBlocked(decision.message, decision.categories, extra)
        if decision.outcome is Outcome.GUARD_ERROR_BLOCK:
            raise GuardUnavailable(decision.message)
        if decision.outcome is Outcome.REWRITE:
            content = encode_json(self._rewritten(state, judged, decision.message))
        if early is not None:
            early[0].headers.update(self._headers(state, decision))
            return early[0]
        if upstream is None:
            upstream = asyncio.create_task(self._open(state, call, content))
        response = await upstream
        headers = {**returned_headers(response.headers), **self._headers(state, decision)}
        if await _upstream_error(response):
            return Reply(response.status_code, (await self._read(state, response))[0], headers)
        if stream and _is_event_stream(response):
            return self._streamed(state, response, headers)
        raw, value = await self._read(state, response)
        body = await self._screen_answer(state, raw, value)
        # x-rsafe-overhead-ms (the proxy's own time) is set on every response by telemetry.http.TraceRequests
        return Reply(200, body, headers)

    async def _early_stream(
        self, state: Screening, screening: asyncio.Future[Any], upstream: asyncio.Task[Answer]
    ) -> tuple[StreamReply, Discard] | None:
        """The streamed answer, its windows read and judged from now on, when the upstream starts it before the
        input's verdict comes (else None): the first window's verdict then need not wait for the input's. Nothing
        of it is released before both have passed (the reply is returned after the input's verdict, and `_abandon`
        drops it when that verdict stops the request)."""
        await asyncio.wait([screening, upstream], return_when=asyncio.FIRST_COMPLETED)
        if screening.done() or upstream.cancelled() or upstream.exception() is not None:
            return None
        response = upstream.result()
        if response.status_code != 200 or not _is_event_stream(response):
            return None
        return self._screened_stream(state, response, returned_headers(response.headers))

    def _headers(self, state: Screening, decision: Decision) -> dict[str, str]:
        policy = state.call.policy
        return {
            "x-rsafe-tenant": state.call.tenant.id,
            "x-rsafe-policy": f"{policy.id}@{policy.version}",
            "x-rsafe-input": decision.outcome.value,
        }

    def _rewritten(self, state: Screening, judged: list[Turn], instruction: str) -> dict[str, Any]:
        """The body with the new turns (those judged after the known-safe conversation) replaced by the policy's
        instruction; a turn that has no replaced form (a reasoning item, say) blocks the request instead."""
        new = state.dialect.rewritten(state.body, state.request, judged, instruction)
        if new is None:
            raise ContentBlocked(state.call.policy.messages.block.input, (), {"policy": state.call.policy.id})
        return new

    async def retrieve(self, call: Call, dialect: Dialect[Any]) -> Reply | StreamReply:
        """Stored answers (a response, a chat completion, a list of them), fetched or returned by another
        operation on them (a response cancelled, a completion's metadata updated: the body goes upstream): their
        output is screened as it was when made, so what the policy stopped then cannot be fetched later. The
        prompt they answered is not in the request: the guard judges the output alone. The operation sends
        upstream only the body it takes (see Dialect.stored_body)."""
        call = replace(call, body=dialect.stored_body(call.method, call.body))
        state = Screening(call, dialect, {}, None, [], "", self._request_span(call))
        span = state.span
        streamed = False
        try:
            response = await self._open(state, call, call.body or None)
            headers = returned_headers(response.headers)
            if await _upstream_error(response):
                return Reply(response.status_code, (await self._read(state, response))[0], headers)
            if _is_event_stream(response):  # a resumed stream
                streamed = True
                return self._streamed(state, response, headers)
            raw, value = await self._read(state, response)
            if (listed := dialect.stored_answers(value)) is not None:
                items = [dialect.answer(item) for item in listed]
                screened = list(await asyncio.gather(*(self.screens.screen_answer(state, item) for item in items)))
                changed = any(new is not old for new, old in zip(screened, items, strict=True))
                body = json.dumps(dialect.with_answers(value, screened)).encode() if changed else raw
                return Reply(200, body, headers)
            answer = dialect.answer(value)
            screened_one = await self.screens.screen_answer(state, answer)
            return Reply(200, raw if screened_one is answer else json.dumps(screened_one).encode(), headers)
        except Exception as error:
            self.recorder.failed(span, error)
            raise
        finally:
            if not streamed:
                self._end(state)

    async def guardrail(self, call: Call) -> Reply:
        """LiteLLM's Generic Guardrail API: the texts LiteLLM sends, judged under the tenant's policy (input
        side for `request`, output side for `response`), answered with LiteLLM's action."""
        body = parse_json(call.body)
        request = guardrail.validate_guardrail(body)
        span = self._request_span(call)
        # no upstream call and no stream: the chat dialect is never asked (the texts are read by apis.guardrail)
        state = Screening(call, CHAT, body, None, guardrail.input_turns(request), "", span)
        try:
            judged: list[Turn] = []
            decision = Decision(Outcome.ALLOW, Side.INPUT)
            if request.input_type == "request":
                try:
                    _, decision, judged = await self.screens.screen_input(state)
                except ContentTooLong as error:  # LiteLLM reads actions, not errors; RSafe's guardrail the code
                    blocked = {
                        "action": "BLOCKED",
                        "blocked_reason": error.message,
                        "code": error.code,
                        "categories": [],
                    }
                    return Reply(200, json.dumps(blocked).encode(), {"content-type": "application/json"})
            elif (text := guardrail.output_text(request)).strip():
                _, decision = await self.screens.screen(state, Side.OUTPUT, "", text)
            answer = guardrail.answer(decision, request, guardrail.judged_texts(request, judged))
            return Reply(200, json.dumps(answer).encode(), {"content-type": "application/json"})
        except Exception as error:
            self.recorder.failed(span, error)
            raise

    async def _screen_answer(self, state: Screening, raw: bytes, value: Any) -> bytes:
        """Screen a non-streamed answer (`raw`, read as `value`); what the policy stops is replaced (the bytes are
        kept when nothing is)."""
        answer = state.dialect.answer(value)
        screened = await self.screens.screen_answer(state, answer)
        return raw if screened is answer else json.dumps(screened).encode()

    def _streamed(self, state: Screening, response: Answer, headers: dict[str, str]) -> StreamReply:
        """The upstream's event stream, screened; a shutdown ends it as its dialect ends a failed stream."""
        return self._screened_stream(state, response, headers)[0]

    def _screened_stream(
        self, state: Screening, response: Answer, headers: dict[str, str]
    ) -> tuple[StreamReply, Discard]:
        """The screened stream, its reading and judging begun now (see WindowedScreen.start), and what drops it
        while none of it was released. Its reply's `closing` ends it however the response went, also when its
        chunks were never iterated (a client gone before the first): the reading stops, the request's spans end."""
        windowed = self._windowed(state)
        reading = AnswerReading()
        windowed.start(_read_events(sse_events(waited(Upstream.chunks(response))), state.dialect, reading))

        async def discard() -> None:
            if not windowed.running:  # once running, the stream's own ending does this (see _stream)
                await windowed.stop()
                await response.aclose()

        async def closing() -> None:
            if not windowed.running:
                await discard()
                self._end(state)

        body = self._stream(state, response, windowed, reading)
        return StreamReply(200, headers, body, ending=windowed.stop_event, closing=closing), discard

    def _windowed(self, state: Screening) -> WindowedScreen:
        """The windowed screen of the request's streamed answer."""
        prompt, policy = state.prompt, state.call.policy

        async def judge(index: int, text: str) -> Decision:
            return (await self.screens.screen(state, Side.OUTPUT, prompt, text))[1]

        # payloads the guard cannot read are stripped, or cut the stream as a violation (policy.unjudged)
        unjudged = Decision(Outcome.BLOCK, Side.OUTPUT, (), policy.messages.block.output)
        ids = state.span.get_span_context()  # the decision id, also in the stream's last event (see WindowedScreen)
        return WindowedScreen(
            state.dialect,
            policy.stream,
            judge,
            unjudged if policy.unjudged == "block" else None,
            decision_id=trace.format_trace_id(ids.trace_id) if ids.is_valid else None,
        )

    async def _stream(
        self, state: Screening, response: Answer, windowed: WindowedScreen, reading: AnswerReading
    ) -> AsyncIterator[bytes]:
        upstream_call = state.opened.pop(id(response), None)
        try:
            async for chunk in windowed.run():
                yield chunk
        finally:
            await response.aclose()
            if upstream_call is not None:
                upstream_call.done(reading, windowed.failure)
            state.span.set_attribute("rsafe.stream.windows", windowed.windows)
            self.screens.unjudged(state, tuple(windowed.stripped))
            if windowed.failure is not None:  # the client got the screened text, then an error event
                state.span.set_attribute("rsafe.stream.upstream_error", str(windowed.failure.code))
            if windowed.refused is not None:  # the answer outgrew its buffer: none of it was judged or sent
                state.span.set_attribute("rsafe.stream.refused", str(windowed.refused.code))
            self._end(state)
