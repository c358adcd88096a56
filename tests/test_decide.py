"""decide(policy, side, verdict): what the proxy does with a verdict, as tables."""

from __future__ import annotations

from typing import Any

import pytest

from rsafe_proxy.guard.protocol import Label, Side, parse_verdict
from rsafe_proxy.guard.screen import Verdict
from rsafe_proxy.policy.decide import Decision, Outcome, decide
from rsafe_proxy.policy.schema import Policy

MESSAGES = {
    "block": {"input": "block-in", "output": "block-out"},
    "rewrite": {"input": "rewrite-in", "output": "rewrite-out"},
    "guard_error": "guard-down",
}


def policy(**fields: Any) -> Policy:
    """Categories of every action and side; `fields` override the rest."""
    return Policy.model_validate(
        {
            "id": "table",
            "categories": [
                {"id": "F1", "name": "Flag both", "action": "flag", "side": "both"},
                {"id": "R1", "name": "Rewrite input", "action": "rewrite", "side": "input"},
                {"id": "R2", "name": "Rewrite output", "action": "rewrite", "side": "output"},
                {"id": "B1", "name": "Block both", "action": "block", "side": "both"},
                {"id": "BI", "name": "Block input", "action": "block", "side": "input"},
                {"id": "BO", "name": "Block output", "action": "block", "side": "output"},
            ],
            "messages": MESSAGES,
            **fields,
        }
    )


IN, OUT = Side.INPUT, Side.OUTPUT
SAFE, UNSAFE, UNKNOWN = Label.SAFE, Label.UNSAFE, Label.UNKNOWN
ALLOW, FLAG, REWRITE, BLOCK = Outcome.ALLOW, Outcome.FLAG, Outcome.REWRITE, Outcome.BLOCK


@pytest.mark.parametrize(
    ("side", "label", "named", "outcome", "categories", "message"),
    [
        # safe passes, whatever the reasoning mentions
        (IN, SAFE, (), ALLOW, (), ""),
        (OUT, SAFE, (), ALLOW, (), ""),
        (IN, SAFE, ("B1",), ALLOW, (), ""),
        # one named category: its action, with the message of that action and side
        (IN, UNSAFE, ("F1",), FLAG, ("F1",), ""),
        (IN, UNSAFE, ("R1",), REWRITE, ("R1",), "rewrite-in"),
        (OUT, UNSAFE, ("R2",), REWRITE, ("R2",), "rewrite-out"),
        (IN, UNSAFE, ("B1",), BLOCK, ("B1",), "block-in"),
        (OUT, UNSAFE, ("B1",), BLOCK, ("B1",), "block-out"),
        # several: the strictest action wins; every named category is recorded
        (IN, UNSAFE, ("F1", "R1"), REWRITE, ("F1", "R1"), "rewrite-in"),
        (IN, UNSAFE, ("R1", "F1"), REWRITE, ("R1", "F1"), "rewrite-in"),
        (IN, UNSAFE, ("F1", "R1", "B1"), BLOCK, ("F1", "R1", "B1"), "block-in"),
        (OUT, UNSAFE, ("BO", "R2", "F1"), BLOCK, ("BO", "R2", "F1"), "block-out"),
        (OUT, UNSAFE, ("F1", "R2"), REWRITE, ("F1", "R2"), "rewrite-out"),
        # the other side's categories are ignored: here a block-on-output category does not block an input
        (IN, UNSAFE, ("BO", "F1"), FLAG, ("F1",), ""),
        (OUT, UNSAFE, ("BI", "R1", "F1"), FLAG, ("F1",), ""),
        (OUT, UNSAFE, ("BI", "R2"), REWRITE, ("R2",), "rewrite-out"),
        # none of this side's categories named: the default action (block here)
        (IN, UNSAFE, (), BLOCK, (), "block-in"),
        (OUT, UNSAFE, (), BLOCK, (), "block-out"),
        (IN, UNSAFE, ("BO",), BLOCK, (), "block-in"),
        (OUT, UNSAFE, ("R1",), BLOCK, (), "block-out"),
        (IN, UNSAFE, ("U1", "XX"), BLOCK, (), "block-in"),
    ],
)
def test_decisions(
    side: Side, label: Label, named: tuple[str, ...], outcome: Outcome, categories: tuple[str, ...], message: str
) -> None:
    decision = decide(policy(), side, Verdict(label, "reasoning", named))
    assert decision == Decision(outcome, side, categories, message, attributed=bool(categories))


@pytest.mark.parametrize(
    ("default", "side", "outcome", "message"),
    [
        ("block", IN, BLOCK, "block-in"),
        ("block", OUT, BLOCK, "block-out"),
        ("rewrite", IN, REWRITE, "rewrite-in"),
        ("rewrite", OUT, REWRITE, "rewrite-out"),
        ("flag", IN, FLAG, ""),
        ("flag", OUT, FLAG, ""),
    ],
)
def test_unattributed_unsafe_takes_the_default_action(default: str, side: Side, outcome: Outcome, message: str) -> None:
    decision = decide(policy(default_action=default), side, Verdict(UNSAFE, "it is harmful"))
    assert decision == Decision(outcome, side, (), message, attributed=False)


@pytest.mark.parametrize(
    ("on_guard_error", "side", "outcome", "message"),
    [
        ("block", IN, Outcome.GUARD_ERROR_BLOCK, "guard-down"),
        ("block", OUT, Outcome.GUARD_ERROR_BLOCK, "guard-down"),
        ("allow", IN, Outcome.GUARD_ERROR_ALLOW, ""),
        ("allow", OUT, Outcome.GUARD_ERROR_ALLOW, ""),
    ],
)
def test_an_unknown_verdict_follows_on_guard_error(
    on_guard_error: str, side: Side, outcome: Outcome, message: str
) -> None:
    # an UNKNOWN verdict never reads as safe, and the categories its text may mention do not matter
    verdict = Verdict(UNKNOWN, "B1 F1", ("B1", "F1"), error="guard timed out")
    decision = decide(policy(on_guard_error=on_guard_error, default_action="flag"), side, verdict)
    assert decision == Decision(outcome, side, (), message)


@pytest.mark.parametrize(
    ("outcome", "passes"),
    [
        (Outcome.ALLOW, True),
        (Outcome.FLAG, True),
        (Outcome.GUARD_ERROR_ALLOW, True),
        (Outcome.REWRITE, False),
        (Outcome.BLOCK, False),
        (Outcome.GUARD_ERROR_BLOCK, False),
    ],
)
def test_which_outcomes_let_the_content_through(outcome: Outcome, passes: bool) -> None:
    assert outcome.passes is passes


def test_the_default_messages_are_used_when_the_policy_sets_none() -> None:
    plain = Policy.model_validate({"id": "plain", "categories": [{"id": "R1", "name": "r", "action": "rewrite"}]})
    rewritten = decide(plain, IN, Verdict(UNSAFE, "R1", ("R1",)))
    assert rewritten.outcome is REWRITE
    assert rewritten.message == plain.messages.rewrite.input
    assert "cannot help" in rewritten.message  # the instruction that makes the upstream model decline
    blocked = decide(plain, OUT, Verdict(UNSAFE, "nothing named"))
    assert blocked.message == plain.messages.block.output


@pytest.mark.parametrize(
    ("guard_output", "side", "outcome", "categories"),
    [
        ("<think>Asks for a dose for themselves: H2.</think> \\boxed{unsafe}", OUT, REWRITE, ("H2",)),
        ("<think>Insults staff (s2) and threatens them (S3).</think> \\boxed{unsafe}", IN, BLOCK, ("S2", "S3")),
        ("<think>Profanity, category S2.</think> \\boxed{unsafe}", IN, FLAG, ("S2",)),
        # H2 is an output category: on input it is not this side's, so the default action applies
        ("<think>Looks like H2.</think> \\boxed{unsafe}", IN, BLOCK, ()),
        # ids are read as whole words: "H22" and "xS2" are not S2 or H2
        ("<think>See H22 and xS2.</think> \\boxed{unsafe}", OUT, BLOCK, ()),
        ("<think>Mentions S3 but is fine.</think> \\boxed{safe}", IN, ALLOW, ()),
    ],
)
def test_from_the_guard_output_to_the_decision(
    guard_output: str, side: Side, outcome: Outcome, categories: tuple[str, ...]
) -> None:
    custom = Policy.model_validate(
        {
            "id": "custom",
            "categories": [
                {"id": "H2", "name": "Individual Prescribing", "action": "rewrite", "side": "output"},
                {"id": "S2", "name": "Profanity", "action": "flag"},
                {"id": "S3", "name": "Threats", "action": "block"},
            ],
        }
    )
    reading = parse_verdict(guard_output, [category.id for category in custom.categories_for(side)])
    decision = decide(custom, side, Verdict(reading.label, reading.reasoning, reading.categories))
    assert (decision.outcome, decision.categories) == (outcome, categories)
