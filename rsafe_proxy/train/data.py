"""Training data: labelled JSONL rows, a stable held-out split, class balance, and the guard prompts.

Rows use the normalized format of the shared datasets: `{id, prompt, response, label, task, source, meta}`.
Prompts are rendered with the proxy's own templates and `render_prompt`, so the model is trained on exactly
what it will be asked at serving time.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from rsafe_proxy.datasets import LABELS, Row
from rsafe_proxy.guard.families import FAMILIES, family
from rsafe_proxy.guard.protocol import CategoryLine, Side, load_system_template, load_template, render_prompt
from rsafe_proxy.policy.schema import Policy

# The answer the score mode reads: an empty think, then the boxed label (see TransformersEngine's score_prefix).
TARGET_PREFIX = "<think>\n</think>\n\\boxed{"


def is_held_out(row_id: str, fraction: float) -> bool:
    """True for the held-out share of ids: a hash of the id, so the split never depends on order or seed."""
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_rows(rows: Iterable[Row], held_out_fraction: float) -> tuple[list[Row], list[Row]]:
    """(train, held_out) by `is_held_out`."""
    train: list[Row] = []
    held_out: list[Row] = []
    for row in rows:
        (held_out if is_held_out(row.id, held_out_fraction) else train).append(row)
    return train, held_out


def balance(rows: Sequence[Row], seed: int, limit: int | None = None) -> list[Row]:
    """Equal numbers of safe and unsafe rows (the larger class is subsampled), at most `limit`, shuffled.

    If one class is absent the rows are returned shuffled and capped: there is nothing to balance against.
    """
    rng = random.Random(seed)
    by_label = {label: [row for row in rows if row.label == label] for label in LABELS}
    for group in by_label.values():
        rng.shuffle(group)
    per_class = min(len(group) for group in by_label.values())
    if per_class == 0:
        chosen = [row for group in by_label.values() for row in group]
    else:
        if limit is not None:
            per_class = min(per_class, max(1, limit // 2))
        chosen = [row for group in by_label.values() for row in group[:per_class]]
    rng.shuffle(chosen)
    return chosen if limit is None else chosen[:limit]


def sample(rows: Sequence[Row], limit: int | None, seed: int) -> list[Row]:
    """At most `limit` rows chosen at random (in their original order), all of them when `limit` is None."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[index] for index in keep]


def trainable_family(name: str) -> str:
    """`name`, checked: a known family whose whole guard prompt is the user message, the one message training
    renders; ValueError otherwise (a family with a system message would be trained on the wrong prompt, one
    with its own fixed categories would never see the policy's)."""
    chosen = family(name)  # raises ValueError naming the known families
    supported = ", ".join(
        known for known, each in FAMILIES.items() if load_system_template(known) is None and not each.taxonomy
    )
    if load_system_template(name) is not None:
        raise ValueError(f"template family {name!r} puts the policy in a system message; training supports {supported}")
    if chosen.taxonomy:
        raise ValueError(f"template family {name!r} has its own fixed categories; training supports {supported}")
    return name


@dataclass(frozen=True)
class PromptBuilder:
    """Renders the guard prompt of a row with a template family and a policy's categories."""

    family: str
    categories: dict[Side, tuple[CategoryLine, ...]]

    def __post_init__(self) -> None:
        trainable_family(self.family)

    @classmethod
    def for_policy(cls, family: str, policy: Policy) -> PromptBuilder:
        """A builder with `policy`'s category block for each side."""
        return cls(family, {side: policy.category_lines(side) for side in Side})

    def render(self, row: Row, prompt: str | None = None, response: str | None = None) -> str:
        """The rendered template text of `row` (optionally with shortened `prompt`/`response` text)."""
        side = row.side
        return render_prompt(
            load_template(self.family, side),
            self.categories[side],
            row.prompt if prompt is None else prompt,
            (row.response or "") if response is None else response,
            family(self.family).line,
        )


def assign_templates(rows: Sequence[Row], families: Sequence[str]) -> list[Row]:
    """Each row with one of `families`, chosen by a hash of its id, so a mixed run sees every family."""
    if len(families) == 1:
        return [replace(row, template=families[0]) for row in rows]
    chosen = []
    for row in rows:
        digest = hashlib.sha256(f"template:{row.id}".encode()).digest()
        chosen.append(replace(row, template=families[int.from_bytes(digest[:4], "big") % len(families)]))
    return chosen


def target_text(label: str) -> str:
    """The answer the model is trained to give: an empty think, then `\\boxed{label}`."""
    return f"{TARGET_PREFIX}{label}}}"
