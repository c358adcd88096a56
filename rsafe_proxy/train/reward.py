"""RSafe's rule-based reward (verl `safety.py`): 0.9 x accuracy + 0.1 x format.

format is 1 when the whole output matches `<think>.*</think>.*\\boxed{.*}.*` (dot matches newlines);
accuracy is format x (the last brace-matched boxed answer, stripped and lower-cased, equals the gold label).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rsafe_proxy.guard.protocol import last_boxed

FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
FORMAT_WEIGHT = 0.1
ACCURACY_WEIGHT = 0.9


def format_reward(output: str) -> float:
    """1.0 when `output` has the `<think>…</think> … \\boxed{…}` shape (the whole text must match), else 0.0."""
    return 1.0 if FORMAT.fullmatch(output) else 0.0


def boxed_answer(output: str) -> str | None:
    """The last brace-matched boxed answer of `output`, stripped and lower-cased; None when there is none."""
    answer = last_boxed(output)
    return None if answer is None else answer.strip().lower()


def accuracy_reward(output: str, gold: str) -> float:
    """1.0 when the format holds and the boxed answer equals `gold` (case and outer spaces ignored), else 0.0."""
    if not format_reward(output):
        return 0.0
    return 1.0 if boxed_answer(output) == gold.strip().lower() else 0.0


def reward(output: str, gold: str) -> float:
    """RSafe's reward: 0.9 x accuracy + 0.1 x format, so 1.0, 0.1 or 0.0."""
    return ACCURACY_WEIGHT * accuracy_reward(output, gold) + FORMAT_WEIGHT * format_reward(output)


def completion_text(completion: object) -> str:
    """A TRL completion as text: a string (plain prompts) or the assistant message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    raise TypeError(f"unexpected completion {type(completion).__name__}")


def accuracy_score(completions: Sequence[object], label: Sequence[str], **_: object) -> list[float]:
    """TRL reward function: `accuracy_reward` of each completion against its row's label (weight 0.9)."""
    return [accuracy_reward(completion_text(c), gold) for c, gold in zip(completions, label, strict=True)]


def format_score(completions: Sequence[object], **_: object) -> list[float]:
    """TRL reward function: `format_reward` of each completion (weight 0.1)."""
    return [format_reward(completion_text(completion)) for completion in completions]


# The reward functions and weights handed to GRPOTrainer: their weighted sum is `reward`, and TRL logs each term
# (rewards/accuracy_score/mean, rewards/format_score/mean) as well as the sum (reward).
REWARD_FUNCTIONS = (accuracy_score, format_score)
REWARD_WEIGHTS = (ACCURACY_WEIGHT, FORMAT_WEIGHT)
