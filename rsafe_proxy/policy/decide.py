"""decide(policy, side, verdict) -> Decision: what the proxy does with a verdict. Pure."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from rsafe_proxy.guard.protocol import Label, Side
from rsafe_proxy.guard.screen import Verdict
from rsafe_proxy.policy.schema import Action, Policy


class Outcome(enum.StrEnum):
    """The proxy's action on one screened piece of content."""

    ALLOW = "allow"
    FLAG = "flag"
    REWRITE = "rewrite"
    BLOCK = "block"
    GUARD_ERROR_BLOCK = "guard_error_block"
    GUARD_ERROR_ALLOW = "guard_error_allow"

    @property
    def passes(self) -> bool:
        """True when the content goes through unchanged."""
        return self in (Outcome.ALLOW, Outcome.FLAG, Outcome.GUARD_ERROR_ALLOW)


@dataclass(frozen=True)
class Decision:
    """A decision with the categories behind it and the text the end user sees instead (if any)."""

    outcome: Outcome
    side: Side
    categories: tuple[str, ...] = ()
    message: str = ""
    attributed: bool = False


_OUTCOME = {Action.FLAG: Outcome.FLAG, Action.REWRITE: Outcome.REWRITE, Action.BLOCK: Outcome.BLOCK}


def decide(policy: Policy, side: Side, verdict: Verdict) -> Decision:
    """Safe passes; unknown follows on_guard_error; unsafe takes the strictest action of the named categories,
    or the policy's default action when the reasoning names none of this side's categories. A controversial
    verdict (a guard's middle level) follows the policy's `controversial`: allow passes, flag passes flagged,
    block decides it as unsafe."""
    if verdict.label is Label.SAFE or (verdict.controversial and policy.controversial == "allow"):
        return Decision(Outcome.ALLOW, side)
    if verdict.label is Label.UNKNOWN:
        if policy.on_guard_error == "allow":
            return Decision(Outcome.GUARD_ERROR_ALLOW, side)
        return Decision(Outcome.GUARD_ERROR_BLOCK, side, message=policy.messages.guard_error)
    applicable = {category.id: category for category in policy.categories_for(side)}
    named = tuple(category for category in verdict.categories if category in applicable)
    if verdict.controversial and policy.controversial == "flag":
        return Decision(Outcome.FLAG, side, named, attributed=bool(named))
    if named:
        action = max((applicable[category].action for category in named), key=lambda action: action.strictness)
    else:
        action = policy.default_action
    outcome = _OUTCOME[action]
    messages = policy.messages.block if outcome is Outcome.BLOCK else policy.messages.rewrite
    message = "" if outcome is Outcome.FLAG else getattr(messages, side.value)
    return Decision(outcome, side, named, message, attributed=bool(named))
