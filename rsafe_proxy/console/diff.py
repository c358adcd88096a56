"""Two policy texts side by side, line by line (difflib), for the policy versions page. Pure."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from itertools import zip_longest
from typing import Literal

Change = Literal["same", "changed", "removed", "added"]


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the side-by-side view: a line of the older text and of the newer (None: no line there)."""

    change: Change
    old_number: int | None
    old: str | None
    new_number: int | None
    new: str | None


def side_by_side(old: str, new: str) -> list[Row]:
    """The rows lining `old` up with `new`: equal lines together, replaced lines paired, the rest alone."""
    old_lines, new_lines = old.splitlines(), new.splitlines()
    rows: list[Row] = []
    matcher = difflib.SequenceMatcher(a=old_lines, b=new_lines, autojunk=False)
    for tag, old_start, old_end, new_start, new_end in matcher.get_opcodes():
        olds = list(range(old_start, old_end))
        news = list(range(new_start, new_end))
        if tag == "equal":
            rows += [Row("same", a + 1, old_lines[a], b + 1, new_lines[b]) for a, b in zip(olds, news, strict=True)]
            continue
        for a, b in zip_longest(olds, news):
            change: Change = "changed" if a is not None and b is not None else "removed" if a is not None else "added"
            rows.append(
                Row(
                    change,
                    None if a is None else a + 1,
                    None if a is None else old_lines[a],
                    None if b is None else b + 1,
                    None if b is None else new_lines[b],
                )
            )
    return rows


def changed_lines(rows: list[Row]) -> int:
    """How many rows differ."""
    return sum(row.change != "same" for row in rows)
