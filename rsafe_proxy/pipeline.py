"""Screen the input, call the upstream, screen the output. Knows no HTTP framework: it returns replies."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span

from rsafe_proxy import dialects, litellm_api, responses_api
from rsafe_proxy.bodies import (
    MAX_CHOICES,
    ChatRequest,
    Kind,
    encode_json,
    parse_json,
    read_choice,
    read_extras,
    read_json,
    replace_choice,
    rewritten_message,
    without_extras,
    without_fields,
)
from rsafe_proxy.errors import ContentBlocked, ContentTooLong, GuardUnavailable, UpstreamUnavailable
from rsafe_proxy.guard.conversation import FIELDS, TOOLS, Turn
from rsafe_proxy.guard.protocol import Label, Side
from rsafe_proxy.guard.screen import Screener, Verdict
from rsafe_proxy.policy.decide import Decision, Outcome, decide
from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.policy.tenants import Tenant
from rsafe_proxy.responses_api import ResponsesRequest
from rsafe_proxy.streaming import Event, WindowedScreen, sse_events
from rsafe_proxy.telemetry import Recorder
from rsafe_proxy.telemetry.context import inject, waited, waiting
from rsafe_proxy.telemetry.genai import AnswerReading, UpstreamCall
from rsafe_proxy.upstream import Upstream, forward_headers, returned_headers

# Which of several input decisions the request gets: the strictest (a guard error blocks before a rewrite).
_SEVERITY: Mapping[Outcome, int] = {
    Outcome.ALLOW: 0,
    Outcome.GUARD_ERROR_ALLOW: 1,
    Outcome.FLAG: 2,
    Outcome.REWRITE: 3,
    Outcome.GUARD_ERROR_BLOCK: 4,
    Outcome.BLOCK: 5,
}


@dataclass(frozen=True)
class Reply:
    """A complete response."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamReply:
    """A streamed response; `chunks` must be iterated to the end or closed."""

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class Call:
    """One client request as the pipeline sees it."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    tenant: Tenant
    policy: Policy


@dataclass
class _Screening:
    """The state of one screened request: its parsed body, the turns the model reads, its span."""

    call: Call
    kind: Kind
    body: dict[str, Any]
    request: dialects.Request | None  # None for a GET of stored answers
    turns: list[Turn]
    prompt: str
    span: Span
    opened: dict[int, UpstreamCall] = field(default_factory=dict)  # upstream calls by id(response), until read
    screens: itertools.count[int] = field(default_factory=itertools.count)  # numbers its decisions (rsafe.seq)

    @property
    def context(self) -> Context:
        return trace.set_span_in_context(self.span)

    def screen_attributes(self, side: Side) -> dict[str, str | int]:
        """The attributes a screen's span starts with: its side, the route, its number within the request."""
        return {"rsafe.side": side.value, "rsafe.route": f"/v1/{self.call.path}", "rsafe.seq": next(self.screens)}


async def _upstream_error(response: httpx.Response) -> bool:
    """True for an upstream error (4xx, 5xx: passed through with its status and body), False for an answer (200).
    Any other status (201, 206, a redirect) is no answer the proxy screens, so it is not passed on either: its
    body could carry generated text, its Location send the client's request past the proxy."""
    if response.status_code >= 400:
        return True
    if response.status_code == 200:
        return False
    await response.aclose()
    raise UpstreamUnavailable(f"The upstream model answered with HTTP {response.status_code}, not with an answer.")


async def _read_events(events: AsyncIterator[Event], reading: AnswerReading) -> AsyncIterator[Event]:
    """`events`, what each says about the answer (model, usage, finish reasons) taken into `reading`."""
    async for event in events:
        reading.read(event.data)
        yield event


async def _discard(task: asyncio.Task[httpx.Response] | None) -> None:
    """Cancel an upstream call; close its response if it had already arrived."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(BaseException):
        response = await task
        await response.aclose()


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
        self.upstream = upstream
        self.recorder = recorder
        self.engine_name = engine_name
        self.parallel = parallel
        self.upstream_api_key = upstream_api_key

    # -- screening ------------------------------------------------------------------------------------------

    async def screen(
        self, state: _Screening, side: Side, prompt: str, response: str | None = None
    ) -> tuple[Verdict, Decision]:
        """One screen: a span, the guard call (or cache), the policy's decision. An answer too long to judge
        within guard.max_segments is withheld (a prompt that long is refused by screen_input)."""
        judging = self.screener.screen(state.call.policy, side, prompt, response, tenant=state.call.tenant.id)
        return await self._judge(state, side, judging)

    async def _judge(self, state: _Screening, side: Side, judging: Awaitable[Verdict]) -> tuple[Verdict, Decision]:
        policy, tenant = state.call.policy, state.call.tenant
        # the guard calls are client spans of their own (telemetry.genai.TracedEngine): none for a cached verdict
        with self.recorder.span("rsafe.screen", state.screen_attributes(side), parent=state.context) as span:
            try:
                verdict = await judging
            except ContentTooLong as error:
                if side is Side.INPUT:
                    raise
                verdict = Verdict(Label.UNKNOWN, error=error.message)
                decision = Decision(Outcome.BLOCK, side, message=policy.messages.block.output)
            else:
                decision = decide(policy, side, verdict)
            self.recorder.screen(span, tenant.id, policy, verdict, decision, self.engine_name)
        return verdict, decision

    async def screen_input(self, state: _Screening) -> tuple[Verdict | None, Decision, list[Turn]]:
        """Judge the conversation unless it is known to be safe as a whole: every turn of a role the policy
        judges, the new ones (after the longest prefix already judged safe) with all the turns before them as
        context; and the tool definitions offered, on their own (the same ones come with every request: cached).
        Returns the verdict, the decision and the new turns (those a rewrite replaces)."""
        policy, tenant = state.call.policy, state.call.tenant.id
        judged = [turn for turn in state.turns if policy.judges_role(turn.role)]
        offered = [turn for turn in judged if turn.role == TOOLS]
        turns = [turn for turn in judged if turn.role != TOOLS]
        known = self.screener.known_turns(policy, turns, tenant=tenant)
        parts = [turns] if known < len(turns) else []
        if offered and self.screener.known_turns(policy, offered, tenant=tenant) < len(offered):
            parts.append(offered)
        if not parts:
            if judged:  # known safe as a whole: the decision is recorded, as a cache hit
                attributes = state.screen_attributes(Side.INPUT)
                with self.recorder.span("rsafe.screen", attributes, parent=state.context) as span:
                    known_safe = Verdict(Label.SAFE, cached=True)
                    decision = Decision(Outcome.ALLOW, Side.INPUT)
                    self.recorder.screen(span, tenant, policy, known_safe, decision, self.engine_name)
            return None, Decision(Outcome.ALLOW, Side.INPUT), []
        screens = [
            self._judge(state, Side.INPUT, self.screener.screen_turns(policy, part, tenant=tenant)) for part in parts
        ]
        tasks = [asyncio.ensure_future(screen) for screen in screens]
        try:
            results = list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one refused (ContentTooLong): the other stops too
                task.cancel()
        if parts[-1] is offered and results[-1][1].outcome is Outcome.REWRITE:  # definitions cannot be rewritten
            flagged = results[-1][1]
            block = Decision(
                Outcome.BLOCK, Side.INPUT, flagged.categories, policy.messages.block.input, flagged.attributed
            )
            results[-1] = (results[-1][0], block)
        verdict, decision = max(results, key=lambda result: _SEVERITY[result[1].outcome])
        return verdict, decision, turns[known:]

    # -- the upstream ---------------------------------------------------------------------------------------

    def _authorization(self, call: Call) -> str | None:
        key = call.tenant.upstream_api_key or self.upstream_api_key
        if key:
            return f"Bearer {key}"
        # drop-in mode: the client's own credentials go upstream; a proxy key never does
        return None if call.tenant.keyed else call.headers.get("authorization")

    async def _open(self, state: _Screening | None, call: Call, content: bytes | None) -> httpx.Response:
        """Send the call upstream inside its client span, which ends when the answer is read (see _read)."""
        parent = state.context if state else None
        base_url = call.tenant.upstream_base_url or self.upstream.base_url
        model = state.request.model if state is not None and state.request is not None else None
        operation = ("text_completion" if state.kind == "completion" else "chat") if state and model else None
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

    async def _read(self, state: _Screening, response: httpx.Response) -> tuple[bytes, Any]:
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
            reading.read(value)
            upstream_call.done(reading)
        return raw, value

    def _end(self, state: _Screening) -> None:
        """End the request's span, and the spans of upstream calls it discarded unread."""
        for upstream_call in state.opened.values():
            upstream_call.span.set_attribute("rsafe.upstream.discarded", True)
            upstream_call.done()
        state.opened.clear()
        state.span.end()

    async def forward(self, call: Call) -> StreamReply:
        """Any other /v1 route: passed through unscreened, streamed back as it comes."""
        response = await self._open(None, call, call.body or None)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in waited(response.aiter_raw()):
                    yield chunk
            except httpx.HTTPError:
                return
            finally:
                await response.aclose()

        return StreamReply(response.status_code, returned_headers(response.headers), body())

    # -- screened routes ------------------------------------------------------------------------------------

    def _request_span(self, call: Call, attributes: Mapping[str, str] | None = None) -> Span:
        """The span of one screened request (a child of the HTTP server span): tenant, policy and route, and
        `attributes`."""
        policy = call.policy
        common = {
            "rsafe.tenant": call.tenant.id,
            "rsafe.policy.id": policy.id,
            "rsafe.policy.version": policy.version,
            "http.route": call.path,
        }
        return self.recorder.tracer.start_span("rsafe.request", attributes={**common, **(attributes or {})})

    async def complete(self, call: Call, kind: Kind) -> Reply | StreamReply:
        """POST /v1/chat/completions, /v1/completions or /v1/responses, screened on both sides."""
        body = parse_json(call.body)
        request, turns, prompt = dialects.validated(kind, body)
        # the upstream gets the body that was judged, re-encoded, never the client's bytes (one reading)
        call = replace(call, body=encode_json(body))
        span = self._request_span(
            call,
            {"rsafe.request.model": request.model, "rsafe.request.kind": kind},
        )
        state = _Screening(call, kind, body, request, turns, prompt, span)
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

    async def _complete(self, state: _Screening, stream: bool) -> Reply | StreamReply:
        call = state.call
        upstream: asyncio.Task[httpx.Response] | None = None
        screening = asyncio.create_task(self.screen_input(state))
        if self.parallel and not dialects.acts_upstream(state.kind, state.body):
            upstream = asyncio.create_task(self._open(state, call, call.body))
        try:
            verdict, decision, judged = await screening
        except BaseException:
            screening.cancel()
            await _discard(upstream)
            raise
        content = call.body
        if decision.outcome is Outcome.BLOCK:
            await _discard(upstream)
            extra = {"policy": call.policy.id}
            if verdict is not None and call.policy.reasoning.return_to_client:
                extra["reasoning"] = verdict.reasoning
            raise ContentBlocked(decision.message, decision.categories, extra)
        if decision.outcome is Outcome.GUARD_ERROR_BLOCK:
            await _discard(upstream)
            raise GuardUnavailable(decision.message)
        if decision.outcome is Outcome.REWRITE:
            await _discard(upstream)
            upstream = None
            content = encode_json(self._rewritten(state, judged, decision.message))
        if upstream is None:
            upstream = asyncio.create_task(self._open(state, call, content))
        response = await upstream
        headers = {**returned_headers(response.headers), **self._headers(state, decision)}
        if await _upstream_error(response):
            return Reply(response.status_code, (await self._read(state, response))[0], headers)
        if stream and response.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamReply(200, headers, self._stream(state, response))
        raw, value = await self._read(state, response)
        body = await self._screen_answer(state, raw, value)
        # x-rsafe-overhead-ms (the proxy's own time) is set on every response by telemetry.http.TraceRequests
        return Reply(200, body, headers)

    def _headers(self, state: _Screening, decision: Decision) -> dict[str, str]:
        policy = state.call.policy
        return {
            "x-rsafe-tenant": state.call.tenant.id,
            "x-rsafe-policy": f"{policy.id}@{policy.version}",
            "x-rsafe-input": decision.outcome.value,
        }

    def _rewritten(self, state: _Screening, judged: list[Turn], instruction: str) -> dict[str, Any]:
        """The body with the new turns (those judged after the known-safe conversation) replaced by the policy's
        instruction; a turn that has no replaced form (a reasoning item, say) blocks the request instead."""
        # the request's other fields among the new turns: they go (they have no replaced form)
        body = without_fields(state.kind, state.body) if any(t.role == FIELDS for t in judged) else dict(state.body)
        if isinstance(state.request, ResponsesRequest):
            new = responses_api.rewritten(body, state.request, judged, instruction)
            if new is None:
                raise ContentBlocked(state.call.policy.messages.block.input, (), {"policy": state.call.policy.id})
            return new
        if not isinstance(state.request, ChatRequest):
            body["prompt"] = instruction
            return body
        positions = {turn.position for turn in judged}
        body["messages"] = [
            rewritten_message(raw, instruction) if position in positions else raw
            for position, raw in enumerate(body["messages"])
        ]
        return body

    async def retrieve(self, call: Call, kind: Kind) -> Reply | StreamReply:
        """Stored answers (a response, a chat completion, a list of them), fetched or returned by another
        operation on them (a response cancelled, a completion's metadata updated: the body goes upstream): their
        output is screened as it was when made, so what the policy stopped then cannot be fetched later. The
        prompt they answered is not in the request: the guard judges the output alone."""
        state = _Screening(call, kind, {}, None, [], "", self._request_span(call))
        span = state.span
        streamed = False
        try:
            response = await self._open(state, call, call.body or None)
            headers = returned_headers(response.headers)
            if await _upstream_error(response):
                return Reply(response.status_code, (await self._read(state, response))[0], headers)
            if response.headers.get("content-type", "").startswith("text/event-stream"):  # a resumed stream
                streamed = True
                return StreamReply(200, headers, self._stream(state, response))
            raw, value = await self._read(state, response)
            if isinstance(value, dict) and value.get("object") == "list" and isinstance(value.get("data"), list):
                items = [dialects.answer(item, kind) for item in value["data"]]
                screened = list(await asyncio.gather(*(self._screened(state, item) for item in items)))
                changed = any(new is not old for new, old in zip(screened, items, strict=True))
                return Reply(200, json.dumps({**value, "data": screened}).encode() if changed else raw, headers)
            answer = dialects.answer(value, kind)
            screened_one = await self._screened(state, answer)
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
        request = litellm_api.validate_guardrail(body)
        span = self._request_span(call)
        state = _Screening(call, "chat", body, None, litellm_api.input_turns(request), "", span)
        try:
            judged: list[Turn] = []
            decision = Decision(Outcome.ALLOW, Side.INPUT)
            if request.input_type == "request":
                try:
                    _, decision, judged = await self.screen_input(state)
                except ContentTooLong as error:  # LiteLLM reads actions, not errors
                    blocked = {"action": "BLOCKED", "blocked_reason": error.message}
                    return Reply(200, json.dumps(blocked).encode(), {"content-type": "application/json"})
            elif (text := litellm_api.output_text(request)).strip():
                _, decision = await self.screen(state, Side.OUTPUT, "", text)
            answer = litellm_api.answer(decision, request, litellm_api.judged_texts(request, judged))
            return Reply(200, json.dumps(answer).encode(), {"content-type": "application/json"})
        finally:
            span.end()

    async def _screen_answer(self, state: _Screening, raw: bytes, value: Any) -> bytes:
        """Screen a non-streamed answer (`raw`, read as `value`); what the policy stops is replaced (the bytes are
        kept when nothing is)."""
        answer = dialects.answer(value, state.kind)
        screened = await self._screened(state, answer)
        return raw if screened is answer else json.dumps(screened).encode()

    async def _screened(self, state: _Screening, answer: dict[str, Any]) -> dict[str, Any]:
        """`answer` with the choices (or the output) the policy stops replaced, and the payloads the guard cannot
        read stripped (or, under `unjudged: block`, their choice replaced); the same object if nothing changes."""
        kind, policy = state.kind, state.call.policy
        if kind == "responses":
            output = responses_api.read_answer(answer)
            stripped: dict[str, Any] = output.value
            self._unjudged(state, output.unjudged)
            if output.unjudged and policy.unjudged == "block":
                return responses_api.stopped(answer, policy.messages.block.output)
            text = "\n".join(output.texts)
            if not text.strip():
                return stripped
            decision = (await self.screen(state, Side.OUTPUT, state.prompt, text))[1]
            if decision.outcome is Outcome.GUARD_ERROR_BLOCK:
                raise GuardUnavailable(decision.message)
            return stripped if decision.outcome.passes else responses_api.stopped(answer, decision.message)
        choices = list(answer["choices"])
        if len(choices) > MAX_CHOICES:  # each is judged: more would take the shared guard from everyone
            raise UpstreamUnavailable(f"The upstream model sent {len(choices)} choices, more than one may ask for.")
        readings = [read_choice(kind, choice) for choice in choices]  # a choice that is no object is read too
        extras = read_extras(answer)  # a provider's fields beside the choices: judged with the first choice
        texts = ["\n".join(reading.texts) if reading else "" for reading in readings] or [""]
        texts[0] = "\n".join(part for part in (texts[0], *extras.texts) if part)
        inner = (f"choices.{n}.{path}" for n, reading in enumerate(readings) if reading for path in reading.unjudged)
        self._unjudged(state, extras.unjudged + tuple(inner))
        unjudged = {n for n, reading in enumerate(readings) if reading and reading.unjudged}
        unjudged |= {0} if extras.unjudged else set()
        stopped: set[int] = set()
        for position, reading in enumerate(readings):
            if reading and reading.unjudged:
                choices[position] = reading.value  # stripped (the policy may still block the choice below)
        if policy.unjudged == "block":
            for position in unjudged:
                if position < len(choices):
                    choices[position] = replace_choice(kind, choices[position], policy.messages.block.output)
                texts[position] = ""
                stopped.add(position)
        judged = [position for position, text in enumerate(texts) if text.strip()]
        results = await asyncio.gather(*(self.screen(state, Side.OUTPUT, state.prompt, texts[i]) for i in judged))
        for position, (_, decision) in zip(judged, results, strict=True):
            if decision.outcome is Outcome.GUARD_ERROR_BLOCK:
                raise GuardUnavailable(decision.message)
            if not decision.outcome.passes:
                if position < len(choices):
                    choices[position] = replace_choice(kind, choices[position], decision.message)
                stopped.add(position)
        if not unjudged and not stopped:
            return answer
        # the extras were judged with the first choice: they go when it is replaced
        return {**(without_extras(answer) if 0 in stopped else extras.value), "choices": choices}

    def _unjudged(self, state: _Screening, paths: tuple[str, ...]) -> None:
        """Record where an answer carried payloads the guard cannot read (stripped or blocked by the policy)."""
        if paths:
            state.span.set_attribute("rsafe.unjudged", list(dict.fromkeys(paths))[:64])
            state.span.set_attribute("rsafe.unjudged.action", state.call.policy.unjudged)

    async def _stream(self, state: _Screening, response: httpx.Response) -> AsyncIterator[bytes]:
        prompt, policy = state.prompt, state.call.policy

        async def judge(index: int, text: str) -> Decision:
            return (await self.screen(state, Side.OUTPUT, prompt, text))[1]

        # payloads the guard cannot read are stripped, or cut the stream as a violation (policy.unjudged)
        unjudged = Decision(Outcome.BLOCK, Side.OUTPUT, (), policy.messages.block.output)
        ids = state.span.get_span_context()  # the decision id, also in the stream's last event (see WindowedScreen)
        windowed = WindowedScreen(
            state.kind,
            policy.stream,
            judge,
            unjudged if policy.unjudged == "block" else None,
            decision_id=trace.format_trace_id(ids.trace_id) if ids.is_valid else None,
        )
        reading = AnswerReading()
        upstream_call = state.opened.pop(id(response), None)
        try:
            async for chunk in windowed.run(_read_events(sse_events(waited(Upstream.chunks(response))), reading)):
                yield chunk
        finally:
            await response.aclose()
            if upstream_call is not None:
                upstream_call.done(reading, windowed.failure)
            state.span.set_attribute("rsafe.stream.windows", windowed.windows)
            self._unjudged(state, tuple(windowed.stripped))
            if windowed.failure is not None:  # the client got the screened text, then an error event
                state.span.set_attribute("rsafe.stream.upstream_error", str(windowed.failure.code))
            self._end(state)
