"""Template families: each renders its own category lines and reads its own verdict format."""

from __future__ import annotations

import pytest

from rsafe_proxy.guard.families import FAMILIES, family, parse_llama_guard
from rsafe_proxy.guard.protocol import CategoryLine, Label, Side, load_system_template, load_template, render_prompt

CATEGORIES = (CategoryLine("S1", "Violent Crimes"), CategoryLine("S2", "Fraud", "Scams and theft."))


@pytest.mark.parametrize(
    ("output", "label", "categories"),
    [
        ("safe", Label.SAFE, ()),
        ("\n\nsafe\n", Label.SAFE, ()),
        ("unsafe\nS1", Label.UNSAFE, ("S1",)),
        ("unsafe\nS2, s1", Label.UNSAFE, ("S1", "S2")),
        ("unsafe", Label.UNSAFE, ()),
        ("unsafe\nS9", Label.UNSAFE, ()),
        ("Unsafe\nS1", Label.UNSAFE, ("S1",)),
        ("", Label.UNKNOWN, ()),
        ("I think this is safe", Label.UNKNOWN, ()),
        ("<think>x</think> \\boxed{safe}", Label.UNKNOWN, ()),
    ],
)
def test_llama_guard_verdicts(output: str, label: Label, categories: tuple[str, ...]) -> None:
    reading = parse_llama_guard(output, ["S1", "S2"])
    assert reading.label is label
    assert reading.categories == categories


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("side", [Side.INPUT, Side.OUTPUT])
def test_every_family_renders_both_sides(name: str, side: Side) -> None:
    chosen = family(name)
    text = render_prompt(load_template(chosen.name, side), CATEGORIES, "the prompt", "the answer", chosen.line)
    system = load_system_template(chosen.name)  # families that put the policy in the system message
    policy = text if system is None else render_prompt(system, CATEGORIES, "", None, chosen.line)
    assert "the prompt" in text
    assert ("the answer" in text) is (side is Side.OUTPUT)
    assert "{" + "CATEGORIES}" not in text + policy
    if chosen.taxonomy:  # the model's own categories are in its prompt, the policy's are not
        assert all(f"\n{name}.\n" in text for name in chosen.taxonomy if name != "Jailbreak")
        assert chosen.line(CATEGORIES[0]) not in text and system is None
        return
    assert chosen.line(CATEGORIES[0]) in policy
    assert system is None or chosen.line(CATEGORIES[0]) not in text


def test_llama_guard_category_lines() -> None:
    text = render_prompt(load_template("llama-guard", Side.INPUT), CATEGORIES, "hi", None, family("llama-guard").line)
    assert "S1: Violent Crimes.\nS2: Fraud. Scams and theft.\n<END UNSAFE CONTENT CATEGORIES>" in text


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="rsafe"):
        family("nope")
