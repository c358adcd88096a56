"""Template families as data: each names its template files, how a category line is written, and how its
verdict is read. RSafe is the default; Llama Guard style lets users keep the guard they already trust."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rsafe_proxy.guard.protocol import CategoryLine, Label, Reading, parse_verdict, rsafe_line


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


@dataclass(frozen=True)
class Family:
    """A guard prompt family: templates in `guard/templates/<name>/`, a category line format, a verdict reader."""

    name: str
    line: Callable[[CategoryLine], str]
    read: Callable[[str, Sequence[str]], Reading]


FAMILIES: Mapping[str, Family] = {
    "rsafe": Family("rsafe", rsafe_line, parse_verdict),
    "rsafe-compact": Family("rsafe-compact", rsafe_line, parse_verdict),
    "llama-guard": Family("llama-guard", llama_guard_line, parse_llama_guard),
}


def family(name: str) -> Family:
    """The family called `name`; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown template family {name!r}; known: {', '.join(FAMILIES)}") from None
