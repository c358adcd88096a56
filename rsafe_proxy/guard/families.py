"""Template families as data: each names its template files, how a category line is written, and how its
verdict is read. RSafe is the default; Llama Guard style lets users keep the guard they already trust;
gpt-oss-safeguard style puts the policy in the system message and answers with a JSON object; Qwen3Guard-Gen
has its own fixed categories and a three-level answer (`Safety: Safe|Unsafe|Controversial`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rsafe_proxy.guard.protocol import CategoryLine, Label, Reading, named_categories, parse_verdict, rsafe_line


def llama_guard_line(category: CategoryLine) -> str:
    """`S1: Name.` as in Llama Guard's prompts, with the description on the same line."""
    line = f"{category.id}: {category.name.rstrip('.')}."
    return line + (f" {' '.join(category.description.split())}" if category.description else "")


def parse_llama_guard(output: str, known_categories: Sequence[str] = ()) -> Reading:
    """First line `safe` or `unsafe`; for unsafe, a second line of comma-separated category ids."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    first = lines[0].lower() if lines else ""
    if first == "safe":
        return Reading(Label.SAFE, output.strip())
    if first != "unsafe":
        return Reading(Label.UNKNOWN, output.strip())
    named = (
        {part.strip().upper() for part in re.split(r"[,\s]+", lines[1]) if part.strip()} if len(lines) > 1 else set()
    )
    categories = tuple(category for category in known_categories if category.upper() in named)
    return Reading(Label.UNSAFE, output.strip(), categories)


def _json_objects(text: str) -> Iterator[tuple[int, Any]]:
    """(start, value) of each top-level JSON object in `text`, in order; an object inside another is not
    yielded on its own, and a `{` that starts no valid JSON is skipped."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):  # not JSON from here, or nested too deep to read
            start = text.find("{", start + 1)
            continue
        yield start, value
        start = text.find("{", end)


def _violation_label(value: object) -> Label:
    """1/0, true/false or "1"/"0" as a label; any other value is UNKNOWN."""
    if isinstance(value, bool):
        return Label.UNSAFE if value else Label.SAFE
    if not isinstance(value, int | str):
        return Label.UNKNOWN
    return {"1": Label.UNSAFE, "0": Label.SAFE}.get(str(value).strip(), Label.UNKNOWN)


def _policy_categories(value: object, known: Sequence[str]) -> tuple[str, ...]:
    """The known ids a `policy_category` value names (a string or a list of them), in policy order."""
    named = value if isinstance(value, list) else [value]
    return named_categories(" ".join(item for item in named if isinstance(item, str)), known)


def _last_decision(answer: str) -> tuple[int, dict[str, Any]] | None:
    """(start, object) of the last top-level JSON object in `answer` that has a `violation` key, or None."""
    found = [item for item in _json_objects(answer) if isinstance(item[1], dict) and "violation" in item[1]]
    return found[-1] if found else None


def parse_gpt_oss_safeguard(output: str, known_categories: Sequence[str] = ()) -> Reading:
    """Read a gpt-oss-safeguard answer: the last JSON object with a `violation` key, or a bare `0` or `1`.

    With a `</think>` (the openai engine puts the reasoning a server split off there), the answer is what
    follows the last one and the reasoning what precedes it; without, the reasoning is the text before the
    answer (a `<think>` never closed is no answer). `policy_category` names the categories of an unsafe verdict.
    Anything else is UNKNOWN: a verdict the model did not clearly give is never taken as safe.
    """
    end = output.rfind("</think>")
    if end == -1 and "<think>" in output:  # a reasoning never closed (cut off): what it holds is no answer
        return Reading(Label.UNKNOWN, output.strip())
    thought = output[:end].replace("<think>", "", 1).strip() if end != -1 else None
    answer = output[end + len("</think>") :] if end != -1 else output
    bare = answer.strip().strip("`").strip()
    if bare in ("0", "1"):
        return Reading(_violation_label(bare), thought or "")
    found = _last_decision(answer)
    if found is None:
        return Reading(Label.UNKNOWN, output.strip())
    start, decision = found
    label = _violation_label(decision["violation"])
    categories = _policy_categories(decision.get("policy_category"), known_categories) if label is Label.UNSAFE else ()
    return Reading(label, answer[:start].strip() if thought is None else thought, categories)


# Qwen3Guard-Gen's own categories, as its chat template lists them (Jailbreak on the prompt side only). A policy
# maps them to its categories with `guard_categories`.
QWEN3GUARD_CATEGORIES = (
    "Violent",
    "Non-violent Illegal Acts",
    "Sexual Content or Sexual Acts",
    "PII",
    "Suicide & Self-Harm",
    "Unethical Acts",
    "Politically Sensitive Topics",
    "Copyright Violation",
    "Jailbreak",
)
_QWEN3GUARD_FIELD = re.compile(r"(Safety|Categories|Refusal)[ \t]*:[ \t]*(.*)", re.I)
_QWEN3GUARD_LEVELS = {"safe": Label.SAFE, "unsafe": Label.UNSAFE, "controversial": Label.UNSAFE}


def _qwen3guard_names(listed: str) -> tuple[str, ...]:
    """The Qwen3Guard category names a `Categories:` value lists (comma-separated, any case), in its order."""
    canonical = {name.lower(): name for name in QWEN3GUARD_CATEGORIES}
    named = {part.strip().rstrip(".").strip().lower() for part in listed.split(",")}
    return tuple(canonical[name] for name in canonical if name in named)


def parse_qwen3guard(output: str, known_categories: Sequence[str] = ()) -> Reading:
    """Read a Qwen3Guard-Gen answer: `Safety: Safe|Unsafe|Controversial`, then `Categories: ...` and, for a
    response, `Refusal: Yes|No`, one field a line.

    The first line must be the `Safety:` field; any other line, a field given twice, or a value outside the
    format makes the answer UNKNOWN (never safe). Controversial is read as UNSAFE with `controversial` set: the
    screener settles it by the policy's `controversial` setting. The categories are Qwen3Guard's own names (the
    screener maps them to the policy's), so `known_categories` is not used. After a `</think>` (a server's
    reasoning parser), only what follows the last one is the answer.
    """
    end = output.rfind("</think>")
    if end == -1 and "<think>" in output:  # a reasoning never closed: no answer
        return Reading(Label.UNKNOWN, output.strip())
    answer = (output[end + len("</think>") :] if end != -1 else output).strip()
    fields: dict[str, str] = {}
    for line in filter(None, (line.strip() for line in answer.splitlines())):
        match = _QWEN3GUARD_FIELD.fullmatch(line)
        # not the format: a line that is no field, a field given twice, or a first line other than Safety
        if match is None or (key := match.group(1).lower()) in fields or (not fields and key != "safety"):
            return Reading(Label.UNKNOWN, answer)
        fields[key] = match.group(2).strip()
    level = fields.get("safety", "").lower()
    refusal = fields.get("refusal", "no").lower()
    if level not in _QWEN3GUARD_LEVELS or refusal not in ("yes", "no"):
        return Reading(Label.UNKNOWN, answer)
    label = _QWEN3GUARD_LEVELS[level]
    categories = _qwen3guard_names(fields.get("categories", "")) if label is Label.UNSAFE else ()
    return Reading(label, answer, categories, controversial=level == "controversial")


@dataclass(frozen=True)
class Family:
    """A guard prompt family: templates in `guard/templates/<name>/`, a category line format, a verdict reader.

    `boxed`: the model answers `\\boxed{safe|unsafe}`, so score mode (one pass ending in a forced `\\boxed{`)
    can read it; the other families are read in generate mode only. `taxonomy`: the model's own fixed categories
    (the prompt lists them, not the policy's); its reader names these, and the screener maps them to the
    policy's categories by their `guard_categories`.
    """

    name: str
    line: Callable[[CategoryLine], str]
    read: Callable[[str, Sequence[str]], Reading]
    boxed: bool = False
    taxonomy: tuple[str, ...] = ()


FAMILIES: Mapping[str, Family] = {
    "rsafe": Family("rsafe", rsafe_line, parse_verdict, boxed=True),
    "rsafe-compact": Family("rsafe-compact", rsafe_line, parse_verdict, boxed=True),
    "llama-guard": Family("llama-guard", llama_guard_line, parse_llama_guard),
    # the policy is the system message (templates/gpt-oss-safeguard/system.txt), the content the user message
    "gpt-oss-safeguard": Family("gpt-oss-safeguard", llama_guard_line, parse_gpt_oss_safeguard),
    # Qwen3Guard-Gen's own layout, byte for byte (templates/qwen3guard/: the user message its chat template
    # renders; chat_template.jinja frames it for the server), its categories fixed
    "qwen3guard": Family("qwen3guard", llama_guard_line, parse_qwen3guard, taxonomy=QWEN3GUARD_CATEGORIES),
}


def family(name: str) -> Family:
    """The family called `name`; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown template family {name!r}; known: {', '.join(FAMILIES)}") from None


def mode_problem(mode: str, chosen: Family) -> str | None:
    """Why `chosen` cannot be read in `mode`, or None: score mode reads only families that answer `\\boxed{}`."""
    if mode != "score" or chosen.boxed:
        return None
    return f"score mode reads \\boxed{{safe|unsafe}}; template family {chosen.name!r} is read in generate mode only"
