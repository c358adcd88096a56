"""What the screener reads of a policy, as Protocols: `guard/` depends on these, never on `rsafe_proxy.policy`
(which imports guard), so imports flow one way. rsafe_proxy.policy.schema.Policy satisfies PolicyView."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rsafe_proxy.guard.protocol import CategoryLine, Side


class Ranked(Protocol):
    """An action: how strict it is, where several categories are violated (the strictest wins)."""

    @property
    def strictness(self) -> int:
        """Higher is stricter."""
        ...


class CategoryView(Protocol):
    """One category: its id and the action its violation takes."""

    @property
    def id(self) -> str:
        """The id verdicts name it by."""
        ...

    @property
    def action(self) -> Ranked:
        """What its violation does."""
        ...


class SideThresholdsView(Protocol):
    """A score-mode threshold per side."""

    def for_side(self, side: Side, otherwise: float) -> float:
        """The threshold of `side`, or `otherwise` where none is named for it."""
        ...


class GuardTuning(Protocol):
    """A policy's own guard settings; None leaves proxy.yaml's."""

    @property
    def max_tokens(self) -> int | None:
        """Tokens the guard may generate."""
        ...

    @property
    def temperature(self) -> float | None:
        """Sampling temperature."""
        ...

    @property
    def top_p(self) -> float | None:
        """Nucleus sampling."""
        ...

    @property
    def score_threshold(self) -> float | SideThresholdsView | None:
        """Score mode: P(unsafe) at or above this is unsafe (one number, or one per side)."""
        ...


class PolicyView(Protocol):
    """The parts of a policy a screen depends on: its version (cache keys), template family, categories (the
    guard prompt, the reading of a verdict, the strictest of several pieces) and guard settings."""

    @property
    def version(self) -> str:
        """The policy's content hash: verdicts are cached per version."""
        ...

    @property
    def template(self) -> str:
        """The template family the policy is rendered with."""
        ...

    @property
    def controversial(self) -> str:
        """What a guard's middle verdict counts as: 'block', 'flag' or 'allow'."""
        ...

    @property
    def default_action(self) -> Ranked:
        """The action of an unsafe verdict that names no category of the policy."""
        ...

    @property
    def guard(self) -> GuardTuning:
        """The policy's own guard settings."""
        ...

    def categories_for(self, side: Side) -> Sequence[CategoryView]:
        """The categories screened on `side`."""
        ...

    def guard_category_ids(self, side: Side, names: tuple[str, ...]) -> tuple[str, ...]:
        """The ids of `side`'s categories that a guard with its own taxonomy named by `names`."""
        ...

    def category_lines(self, side: Side) -> tuple[CategoryLine, ...]:
        """The category block the guard sees on `side`."""
        ...
