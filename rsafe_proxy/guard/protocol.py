"""The RSafe guard protocol: rendering prompts from the template files and reading verdicts.

The templates are package data, byte-exact with what the RSafe checkpoint saw in training; a policy's
categories replace the category block. User content is neutralised before it is placed in the conversation
block, so that it cannot close the block, fake another turn, or plant a verdict the parser might read.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources

_PLACEHOLDER = re.compile(r"\{(CATEGORIES|PROMPT|RESPONSE)\}")

# Markers of the template and of the model's answer, as a user could type them (any case, odd spacing).
_FORGERIES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"<\s*(/?)\s*think\s*>", re.I), r"[\1think]"),
    (re.compile(r"\\+\s*boxed\s*\{", re.I), "[boxed]{"),
    (
        re.compile(
            r"<\s*(BEGIN|END)\s+(CONVERSATION|UNSAFE\s+CONTENT\s+CATEGORIES|(?:SAFETY|REFUSAL)\s+POLICY)\s*>", re.I
        ),
        r"[\1 \2]",
    ),
    # chat-template control tokens a tokenizer would read as such: a forged turn or answer channel (gpt-oss's
    # harmony `<|start|>assistant<|channel|>final<|message|>`, Qwen's `<|im_start|>`, Gemma's `<start_of_turn>`)
    (re.compile(r"<\|\s*(\w+)\s*\|>"), r"[|\1|]"),
    (re.compile(r"<\s*(start_of_turn|end_of_turn)\s*>", re.I), r"[\1]"),
    # a line that starts like a turn of the conversation ("Agent: ...") would fake that turn
    (re.compile(r"^([ \t]*)(user|agent|assistant|system)([ \t]*):", re.I | re.M), r"\1\2\3 -"),
)


class Side(enum.StrEnum):
    """Which side of the exchange is screened."""

    INPUT = "input"
    OUTPUT = "output"


class Label(enum.StrEnum):
    """A verdict. UNKNOWN is never treated as safe."""

    SAFE = "safe"
    UNSAFE = "unsafe"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CategoryLine:
    """One line of the policy's category block."""

    id: str
    name: str
    description: str = ""


@dataclass(frozen=True)
class Reading:
    """A verdict read from a guard's output: the label, the reasoning, the category ids it named.

    `controversial`: the guard's answer was the middle of a three-level scale (Qwen3Guard's Controversial),
    read as UNSAFE until the policy's `controversial` setting settles it.
    """

    label: Label
    reasoning: str
    categories: tuple[str, ...] = ()
    controversial: bool = False


@cache
def load_template(family: str, side: Side) -> str:
    """The template text of `family` for `side`, from the package data."""
    name = "prompt.txt" if side is Side.INPUT else "response.txt"
    return resources.files("rsafe_proxy.guard").joinpath("templates", family, name).read_text(encoding="utf-8")


@cache
def load_system_template(family: str) -> str | None:
    """The system-message template of `family` (families that put the policy there), or None."""
    path = resources.files("rsafe_proxy.guard").joinpath("templates", family, "system.txt")
    return path.read_text(encoding="utf-8") if path.is_file() else None


def rsafe_line(category: CategoryLine) -> str:
    """`U1  - Name`: ids padded to three characters, as in RSafe's training data."""
    line = f"{category.id:<3} - {category.name}"
    return line + (f": {' '.join(category.description.split())}" if category.description else "")


def render_categories(categories: Sequence[CategoryLine], line: Callable[[CategoryLine], str] = rsafe_line) -> str:
    """The category block: one `line` per category, each ending in a newline."""
    return _category_block(tuple(categories), line)


@lru_cache(maxsize=256)
def _category_block(categories: tuple[CategoryLine, ...], line: Callable[[CategoryLine], str]) -> str:
    # every guard call renders its policy's block: made once per policy, side and family (a few per tenant)
    return "".join(line(category) + "\n" for category in categories)


def neutralize(content: str) -> str:
    """User or model content made inert inside the conversation block (see _FORGERIES)."""
    for pattern, replacement in _FORGERIES:
        content = pattern.sub(replacement, content)
    return content


def render_prompt(
    template: str,
    categories: Sequence[CategoryLine],
    prompt: str,
    response: str | None = None,
    line: Callable[[CategoryLine], str] = rsafe_line,
) -> str:
    """Fill `template` in one pass, so text inside the content is never taken for a placeholder."""
    values = {
        "CATEGORIES": render_categories(categories, line),
        "PROMPT": neutralize(prompt),
        "RESPONSE": neutralize(response or ""),
    }
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def last_boxed(text: str) -> str | None:
    """The content of the last brace-matched `\\boxed{...}` in `text`, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, index = 1, start + len("\\boxed{")
        while index < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        if depth == 0:
            return text[start + len("\\boxed{") : index - 1]
        start = text.rfind("\\boxed{", 0, start)
    return None


def parse_verdict(output: str, known_categories: Sequence[str] = ()) -> Reading:
    """Read RSafe's answer: the last brace-matched `\\boxed{}` after the last `</think>`.

    Without a `</think>`, or without a boxed answer after it, or with anything but safe/unsafe in the box,
    the label is UNKNOWN: a verdict the model did not clearly give is never taken as safe.
    """
    end = output.rfind("</think>")
    if end == -1:
        return Reading(Label.UNKNOWN, output.strip())
    reasoning = output[:end].replace("<think>", "", 1).strip()
    answer = last_boxed(output[end:])
    label = {"safe": Label.SAFE, "unsafe": Label.UNSAFE}.get((answer or "").strip().lower(), Label.UNKNOWN)
    return Reading(label, reasoning, named_categories(reasoning, known_categories) if label is Label.UNSAFE else ())


def named_categories(reasoning: str, known: Sequence[str]) -> tuple[str, ...]:
    """The known category ids the reasoning names, in policy order (RSafe's output has no category field)."""
    if not known:
        return ()
    named = {match.group(1).upper() for match in re.finditer(r"(?<![\w-])([A-Za-z][\w-]*)(?![\w-])", reasoning)}
    return tuple(category for category in known if category.upper() in named)
