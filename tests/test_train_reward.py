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


torch = pytest.importorskip("torch")

from rsafe_proxy.train.grpo import answer_mask, group_advantages, policy_loss, prompt_order  # noqa: E402


@pytest.mark.parametrize(
    ("rewards", "size", "expected"),
    [
        ([1.0, 0.1, 1.0, 0.1], 4, [1.0, -1.0, 1.0, -1.0]),
        ([1.0, 1.0, 0.0, 0.0, 0.1, 0.1], 2, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),  # no spread, no signal
        ([1.0, 0.0, 0.0, 0.0], 4, [math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)]),
    ],
)
def test_group_advantages(rewards: list[float], size: int, expected: list[float]) -> None:
    assert group_advantages(rewards, size) == pytest.approx(expected, abs=1e-3)


def test_group_advantages_need_whole_groups() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1.0, 0.0, 1.0], 4)


def test_answer_mask_keeps_tokens_through_the_first_stop() -> None:
    completions = torch.tensor([[5, 6, 9, 0, 0], [5, 9, 7, 9, 0], [5, 6, 7, 8, 4]])
    assert answer_mask(completions, [9]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_policy_loss_pushes_up_the_better_answer() -> None:
    log_probs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    keep = torch.tensor([[1, 1], [1, 0]])
    loss = policy_loss(log_probs, keep, torch.tensor([1.0, -1.0]), None, 0.0)
    loss.backward()  # type: ignore[no-untyped-call]
    assert log_probs.grad is not None
    # descent raises the log-probabilities of the positive-advantage answer, lowers the other's, ignores padding
    assert log_probs.grad.tolist() == [[-0.25, -0.25], [0.5, 0.0]]


def test_prompt_order_covers_every_example_once_per_pass() -> None:
    first_pass = [index for step in range(5) for index in prompt_order(10, step, 2, seed=3)]
    assert sorted(first_pass) == list(range(10))
    assert prompt_order(10, 7, 2, seed=3) == prompt_order(10, 7, 2, seed=3)
