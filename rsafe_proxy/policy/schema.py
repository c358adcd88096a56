"""The policy file schema (YAML) that compliance teams write: categories, actions, messages, guard settings."""

from __future__ import annotations

import enum
import hashlib
import json
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rsafe_proxy.guard.protocol import CategoryLine, Side


class Action(enum.StrEnum):
    """What happens to content that violates a category, from the mildest to the strictest."""

    FLAG = "flag"
    REWRITE = "rewrite"
    BLOCK = "block"

    @property
    def strictness(self) -> int:
        """Order used when several categories are violated: the strictest wins."""
        return {Action.FLAG: 0, Action.REWRITE: 1, Action.BLOCK: 2}[self]


class Applies(enum.StrEnum):
    """Which side of the exchange a category is screened on."""

    INPUT = "input"
    OUTPUT = "output"
    BOTH = "both"

    def covers(self, side: Side) -> bool:
        """True when the category applies to `side`."""
        return self is Applies.BOTH or self.value == side.value


class StreamMode(enum.StrEnum):
    """How streamed answers are screened (DESIGN §6)."""

    CHUNKED = "chunked"
    BUFFER = "buffer"
    ASYNC = "async"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Category(_Frozen):
    """One unsafe-content category of the policy."""

    id: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: str = ""
    action: Action = Action.BLOCK
    side: Applies = Applies.BOTH

    @field_validator("name", "description")
    @classmethod
    def _one_line_name(cls, value: str) -> str:
        if "<" in value and ">" in value:
            raise ValueError("must not contain markup like <...>: it would change the guard prompt")
        return value


class SideMessages(_Frozen):
    """End-user text for one action, per side."""

    input: str
    output: str


class Messages(_Frozen):
    """What end users see. `rewrite.input` is the instruction that replaces a violating prompt."""

    block: SideMessages = SideMessages(
        input="Your request was blocked by the content policy.",
        output="The response was withheld because it violated the content policy.",
    )
    rewrite: SideMessages = SideMessages(
        input=(
            "The user's previous message was removed because it violated the content policy. "
            "Politely say that you cannot help with that request."
        ),
        output="The response was replaced because it violated the content policy.",
    )
    guard_error: str = "The safety check is unavailable; please retry later."


class StreamSettings(_Frozen):
    """Windowed screening of streamed answers, in characters."""

    mode: StreamMode = StreamMode.CHUNKED
    window_chars: Annotated[int, Field(ge=16, le=1_000_000)] = 600
    overlap_chars: Annotated[int, Field(ge=0, le=100_000)] = 120

    @model_validator(mode="after")
    def _overlap_smaller(self) -> Self:
        if self.overlap_chars >= self.window_chars:
            raise ValueError("overlap_chars must be smaller than window_chars")
        return self


class Reasoning(_Frozen):
    """Where the guard's reasoning trace goes."""

    capture: bool = True
    return_to_client: bool = False


class GuardOverrides(_Frozen):
    """Per-policy guard settings; unset ones come from proxy.yaml."""

    max_tokens: Annotated[int, Field(ge=1, le=32_768)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None


class Example(_Frozen):
    """A policy regression test: this text on this side must get this verdict."""

    text: str
    side: Side = Side.INPUT
    prompt: str | None = None
    expected: Literal["safe", "unsafe"]


class Policy(_Frozen):
    """A tenant's policy as written in its YAML file."""

    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    template: Literal["rsafe"] = "rsafe"
    categories: Annotated[tuple[Category, ...], Field(min_length=1)]
    default_action: Action = Action.BLOCK
    messages: Messages = Messages()
    on_guard_error: Literal["block", "allow"] = "block"
    stream: StreamSettings = StreamSettings()
    reasoning: Reasoning = Reasoning()
    guard: GuardOverrides = GuardOverrides()
    examples: tuple[Example, ...] = ()

    @field_validator("categories")
    @classmethod
    def _unique_ids(cls, categories: tuple[Category, ...]) -> tuple[Category, ...]:
        seen: set[str] = set()
        for category in categories:
            if category.id.upper() in seen:
                raise ValueError(f"category id {category.id!r} is used twice")
            seen.add(category.id.upper())
        return categories

    @property
    def version(self) -> str:
        """A hash of the normalized content: every decision records it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def categories_for(self, side: Side) -> tuple[Category, ...]:
        """The categories screened on `side`."""
        return tuple(category for category in self.categories if category.side.covers(side))

    def category_lines(self, side: Side) -> tuple[CategoryLine, ...]:
        """The category block the guard sees on `side`."""
        return tuple(CategoryLine(c.id, c.name, c.description) for c in self.categories_for(side))
