"""The screens of one request: its input turns, and each answer or window of it, judged by the guard and
decided under the tenant's policy, each in a span of its own. Knows no API's shapes: an answer's texts, and
how to stop them, come from the request's dialect."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span

from rsafe_proxy.apis import Dialect
from rsafe_proxy.calls import Call
from rsafe_proxy.errors import ContentTooLong, GuardUnavailable
from rsafe_proxy.guard.conversation import TOOLS, Turn
from rsafe_proxy.guard.protocol import Label, Side
from rsafe_proxy.guard.screen import Screener, Verdict
from rsafe_proxy.policy.decide import Decision, Outcome, decide
from rsafe_proxy.telemetry import Recorder
from rsafe_proxy.telemetry.genai import UpstreamCall

# Which of several input decisions the request gets: the strictest (a guard error blocks before a rewrite).
_SEVERITY: Mapping[Outcome, int] = {
    Outcome.ALLOW: 0,
    Outcome.GUARD_ERROR_ALLOW: 1,
    Outcome.FLAG: 2,
    Outcome.REWRITE: 3,
    Outcome.GUARD_ERROR_BLOCK: 4,
    Outcome.BLOCK: 5,
}


@dataclass
class Screening:
    """The state of one screened request: its dialect, parsed body and request, the turns the model reads, the
    prompt an answer replies to, its span."""

    call: Call
    dialect: Dialect[Any]
    body: dict[str, Any]
    request: Any  # the dialect's validated request; None for a GET of stored answers
    turns: list[Turn]
    prompt: str
    span: Span
    opened: dict[int, UpstreamCall] = field(default_factory=dict)  # upstream calls by id(response), until read
    screens: itertools.count[int] = field(default_factory=itertools.count)  # numbers its decisions (rsafe.seq)

    @property
    def context(self) -> Context:
        """The request span's context: the parent of its screens and upstream calls."""
        return trace.set_span_in_context(self.span)

    def screen_attributes(self, side: Side) -> dict[str, str | int]:
        """The attributes a screen's span starts with: its side, the route, its number within the request."""
        return {"rsafe.side": side.value, "rsafe.route": f"/v1/{self.call.path}", "rsafe.seq": next(self.screens)}


class Screens:
    """Judging for one app: the screener (guard and cache) and the recorder are injected."""

    def __init__(self, screener: Screener, recorder: Recorder, engine_name: str) -> None:
        self.screener = screener
        self.recorder = recorder
        self.engine_name = engine_name

    async def screen(
        self, state: Screening, side: Side, prompt: str, response: str | None = None
    ) -> tuple[Verdict, Decision]:
        """One screen: a span, the guard call (or cache), the policy's decision. An answer too long to judge
        within guard.max_segments is withheld (a prompt that long is refused by screen_input)."""
        judging = self.screener.screen(state.call.policy, side, prompt, response, tenant=state.call.tenant.id)
        return await self._judge(state, side, judging)

    async def _judge(self, state: Screening, side: Side, judging: Awaitable[Verdict]) -> tuple[Verdict, Decision]:
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

    async def screen_input(self, state: Screening) -> tuple[Verdict | None, Decision, list[Turn]]:
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

    async def screen_answer(self, state: Screening, answer: dict[str, Any]) -> dict[str, Any]:
        """`answer` with the positions (choices, or the output) the policy stops replaced, and the payloads the
        guard cannot read stripped (or, under `unjudged: block`, their position replaced); the same object if
        nothing changes. Each position is judged on its own, all at once."""
        policy = state.call.policy
        reading = state.dialect.read_answer(answer)
        self.unjudged(state, reading.unjudged)
        texts = list(reading.texts)
        stops: dict[int, str] = {}
        if policy.unjudged == "block":
            for position in reading.unjudged_at:
                stops[position] = policy.messages.block.output
                texts[position] = ""
        judged = [position for position, text in enumerate(texts) if text.strip()]
        results = await asyncio.gather(*(self.screen(state, Side.OUTPUT, state.prompt, texts[i]) for i in judged))
        for position, (_, decision) in zip(judged, results, strict=True):
            if decision.outcome is Outcome.GUARD_ERROR_BLOCK:
                raise GuardUnavailable(decision.message)
            if not decision.outcome.passes:
                stops[position] = decision.message
        if not reading.unjudged and not stops:
            return answer
        return state.dialect.replaced(answer, reading, stops)

    def unjudged(self, state: Screening, paths: tuple[str, ...]) -> None:
        """Record where an answer carried payloads the guard cannot read (stripped or blocked by the policy)."""
        if paths:
            state.span.set_attribute("rsafe.unjudged", list(dict.fromkeys(paths))[:64])
            state.span.set_attribute("rsafe.unjudged.action", state.call.policy.unjudged)
