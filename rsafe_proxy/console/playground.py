"""The playground: one text screened as the proxy screens traffic, with the proxy's own engine and settings and
the tenant's policy now in force, then decided by the policy. Nothing is forwarded upstream, nothing is written
to the audit log, and the verdict cache is neither read nor written (the caller passes `Screener.uncached()`):
it is a trial, not traffic."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rsafe_proxy.errors import ContentTooLong
from rsafe_proxy.guard.conversation import Turn
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.guard.screen import Screener, Verdict
from rsafe_proxy.policy.decide import Decision, decide
from rsafe_proxy.policy.schema import Policy


@dataclass(frozen=True, slots=True)
class Trial:
    """What the playground shows: the verdict, what the policy does with it, and how long it took."""

    policy_id: str
    policy_version: str
    side: Side
    verdict: Verdict | None
    decision: Decision | None
    latency_ms: float
    refused: str | None = None  # why the text could not be screened at all (too long)


async def try_text(screener: Screener, policy: Policy, tenant: str, side: Side, text: str, prompt: str = "") -> Trial:
    """Screen `text` for `tenant` under `policy`: on the input side as a one-message conversation (as a chat
    request with one user message is judged), on the output side as an answer to `prompt`."""
    started = time.perf_counter()
    try:
        if side is Side.INPUT:
            verdict = await screener.screen_turns(policy, [Turn("user", text)], tenant=tenant)
        else:
            verdict = await screener.screen(policy, Side.OUTPUT, prompt, text, tenant=tenant)
    except ContentTooLong as error:
        elapsed = (time.perf_counter() - started) * 1000
        return Trial(policy.id, policy.version, side, None, None, elapsed, refused=error.message)
    elapsed = (time.perf_counter() - started) * 1000
    return Trial(policy.id, policy.version, side, verdict, decide(policy, side, verdict), elapsed)
