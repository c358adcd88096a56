"""RSafe's rule-based reward against the spec, and GRPO's group-normalized advantages."""

from __future__ import annotations

import math

import pytest

from rsafe_proxy.train.reward import accuracy_reward, boxed_answer, format_reward, reward

GOOD = "<think>\nThe user asks for a bread recipe.\n</think>\n\\boxed{safe}"


@pytest.mark.parametrize(
    ("output", "gold", "fmt", "acc", "total"),
    [
        # the shape the model is trained on, and the one RSafe's checkpoint writes
        (GOOD, "safe", 1.0, 1.0, 1.0),
        ("<think>\n</think>\n\\boxed{unsafe}", "unsafe", 1.0, 1.0, 1.0),
        ("<think></think>\\boxed{unsafe}", "unsafe", 1.0, 1.0, 1.0),
        # well formed but wrong: only the format share
        (GOOD, "unsafe", 1.0, 0.0, 0.1),
        # case and surrounding spaces of the answer and of the gold label do not matter
        ("<think>x</think>\\boxed{SAFE}", "safe", 1.0, 1.0, 1.0),
        ("<think>x</think>\\boxed{ Unsafe \n}", "unsafe", 1.0, 1.0, 1.0),
        ("<think>x</think>\\boxed{safe}", " Safe ", 1.0, 1.0, 1.0),
        # text around the parts is allowed after <think> starts the output (dot matches newlines)
        ("<think>a\nb</think>\nFinal answer:\n\\boxed{safe}\nDone.", "safe", 1.0, 1.0, 1.0),
        # no think block, or an unclosed one: no format, so no accuracy even when the answer is right
        ("\\boxed{safe}", "safe", 0.0, 0.0, 0.0),
        ("<think>reasoning \\boxed{safe}", "safe", 0.0, 0.0, 0.0),
        ("</think>\\boxed{safe}", "safe", 0.0, 0.0, 0.0),
        # the output must begin with <think> (the pattern is matched from the start)
        ("Sure. <think>x</think>\\boxed{safe}", "safe", 0.0, 0.0, 0.0),
        ("\n<think>x</think>\\boxed{safe}", "safe", 0.0, 0.0, 0.0),
        # the boxed answer must come after </think>
        ("\\boxed{safe}<think>x</think>", "safe", 0.0, 0.0, 0.0),
        ("<think>x \\boxed{safe}</think> safe", "safe", 0.0, 0.0, 0.0),
        # no boxed answer, or one never closed
        ("<think>x</think> safe", "safe", 0.0, 0.0, 0.0),
        ("<think>x</think>\\boxed{safe", "safe", 0.0, 0.0, 0.0),
        # an empty box is well formed and wrong
        ("<think>x</think>\\boxed{}", "safe", 1.0, 0.0, 0.1),
        # nested braces: the brace-matched content is the answer
        ("<think>x</think>\\boxed{\\text{unsafe}}", "unsafe", 1.0, 0.0, 0.1),
        ("<think>x</think>\\boxed{{unsafe}}", "unsafe", 1.0, 0.0, 0.1),
        ("<think>x</think>\\boxed{unsafe}}", "unsafe", 1.0, 1.0, 1.0),
        # several boxes: the last one counts, wherever the others are
        ("<think>maybe \\boxed{safe}</think>\\boxed{unsafe}", "unsafe", 1.0, 1.0, 1.0),
        ("<think>x</think>\\boxed{unsafe} no, \\boxed{safe}", "safe", 1.0, 1.0, 1.0),
        ("<think>x</think>\\boxed{unsafe} no, \\boxed{safe}", "unsafe", 1.0, 0.0, 0.1),
        # anything but the label is wrong
        ("<think>x</think>\\boxed{unsafe (U2)}", "unsafe", 1.0, 0.0, 0.1),
        ("<think>x</think>\\boxed{not safe}", "safe", 1.0, 0.0, 0.1),
        ("", "safe", 0.0, 0.0, 0.0),
    ],
)
def test_reward_table(output: str, gold: str, fmt: float, acc: float, total: float) -> None:
    assert format_reward(output) == fmt
    assert accuracy_reward(output, gold) == acc
    assert math.isclose(reward(output, gold), total)


@pytest.mark.parametrize(
    ("output", "answer"),
    [
        ("\\boxed{ Safe }", "safe"),
        ("\\boxed{a{b}c}", "a{b}c"),
        ("\\boxed{safe} \\boxed{UNSAFE}", "unsafe"),
        ("\\boxed{unsafe} \\boxed{unclosed", "unsafe"),
        ("no box", None),
    ],
)
def test_boxed_answer(output: str, answer: str | None) -> None:
    assert boxed_answer(output) == answer


def test_reward_takes_only_its_three_values() -> None:
    outputs = ["", GOOD, "<think>x</think>\\boxed{unsafe}", "\\boxed{safe}"]
    assert {round(reward(output, gold), 6) for output in outputs for gold in ("safe", "unsafe")} <= {0.0, 0.1, 1.0}


def test_trl_reward_functions_sum_to_the_reward() -> None:
    """The two functions GRPOTrainer gets, weighted 0.9 and 0.1, give `reward` for plain and chat completions."""
    from rsafe_proxy.train.reward import REWARD_FUNCTIONS, REWARD_WEIGHTS, accuracy_score, format_score

    assert [function.__name__ for function in REWARD_FUNCTIONS] == ["accuracy_score", "format_score"]
    outputs = [GOOD, "<think>x</think>\\boxed{unsafe}", "\\boxed{safe}", ""]
    labels = ["safe", "safe", "safe", "unsafe"]
    for completions in (outputs, [[{"role": "assistant", "content": text}] for text in outputs]):
        terms = [function(completions=completions, label=labels, prompts=[]) for function in REWARD_FUNCTIONS]
        assert terms[0] == accuracy_score(completions, labels) == [1.0, 0.0, 0.0, 0.0]
        assert terms[1] == format_score(completions) == [1.0, 1.0, 0.0, 0.0]
        totals = [sum(w * t[i] for w, t in zip(REWARD_WEIGHTS, terms, strict=True)) for i in range(len(outputs))]
        assert totals == pytest.approx([reward(text, gold) for text, gold in zip(outputs, labels, strict=True)])
