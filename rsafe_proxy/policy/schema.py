"""The policy file schema (YAML) that compliance teams write: categories, actions, messages, guard settings."""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from rsafe_proxy.guard.conversation import ROLES, Role
from rsafe_proxy.guard.families import family
from rsafe_proxy.guard.protocol import CategoryLine, Side
from rsafe_proxy.paths import pattern_problem
from rsafe_proxy.yamlsource import InvalidPart


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


def _identifier(pattern: str, rule: str) -> AfterValidator:
    """Checks `pattern` with a message in plain words (the JSON Schema still carries the pattern)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid id: {rule}")
        return value

    return AfterValidator(check)


# No '.' in category ids: attribution reads ids as words of the reasoning, and a '.' ends a sentence there.
_CATEGORY_ID = r"[A-Za-z][A-Za-z0-9_-]*"
_POLICY_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
CategoryId = Annotated[
    str,
    Field(min_length=1, max_length=32, json_schema_extra={"pattern": f"^{_CATEGORY_ID}$"}),
    _identifier(_CATEGORY_ID, "start with a letter, then only letters, digits, '_' or '-' (like U1 or H2)"),
]
PolicyId = Annotated[
    str,
    Field(min_length=1, max_length=64, json_schema_extra={"pattern": f"^{_POLICY_ID}$"}),
    _identifier(_POLICY_ID, "only letters, digits, '_', '.' or '-', starting with a letter or digit"),
]


class Category(_Frozen):
    """One unsafe-content category of the policy."""

    id: CategoryId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: str = ""
    action: Action = Action.BLOCK
    side: Applies = Applies.BOTH

    @field_validator("name", "description")
    @classmethod
    def _no_markup(cls, value: str) -> str:
        if "<" in value and ">" in value:
            raise ValueError("must not contain markup like <...>: it would change the guard prompt")
        return value

    @field_validator("name")
    @classmethod
    def _one_line_name(cls, value: str) -> str:
        # the name is rendered as is into the category block: a line break would start a fake category line
        if "\n" in value or "\r" in value:
            raise ValueError("must be one line (put longer text in 'description')")
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
            raise InvalidPart(["overlap_chars"], "must be smaller than window_chars")
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


class PassthroughRoute(_Frozen):
    """A route forwarded to the upstream UNSCREENED, besides the proxy's own list of routes that generate
    nothing (models, embeddings, moderations, deletions). List only routes that neither generate content nor
    return stored generated content (a file's metadata: yes; a batch's output file: no). Routes the proxy
    screens stay screened whatever this list says."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field(
        description="The HTTP method (GET also admits HEAD)."
    )
    path: str = Field(
        description="A canonical path under /v1/ whose segments are literal names or whole-segment "
        "placeholders matching any one segment, e.g. /v1/files or /v1/files/{file_id}; the segment after "
        "/v1/ is a literal. Matched case-sensitively on the canonical path.",
        json_schema_extra={"examples": ["/v1/files", "/v1/files/{file_id}"]},
    )

    @field_validator("path")
    @classmethod
    def _route_pattern(cls, path: str) -> str:
        problem = pattern_problem(path)
        if problem is not None:
            raise ValueError(problem)
        return path


class Policy(_Frozen):
    """A tenant's policy as written in its YAML file."""

    id: PolicyId
    description: str = ""
    template: str = "rsafe"
    categories: Annotated[tuple[Category, ...], Field(min_length=1)]
    default_action: Action = Action.BLOCK
    messages: Messages = Messages()
    on_guard_error: Literal["block", "allow"] = "block"
    input_roles: Annotated[tuple[Role, ...], Field(min_length=1)] = Field(
        ROLES,
        description="The roles of the turns the input screen judges, each turn with the conversation before it: "
        "system, developer, user, assistant (turns the client supplies, a prefill included: their text, refusals "
        "and tool calls), tool and function (tool results, the classic indirect prompt injection; in the "
        "Responses API every tool output item, and the model's own items given back count as assistant). All of "
        "them by default. 'user' cannot be left out; a turn of any role not listed here is always judged, and "
        "so are the tool definitions and answer schema a request offers (judged on their own).",
    )
    unjudged: Literal["strip", "block"] = Field(
        "strip",
        description="What happens to the parts of a generated answer that the guard cannot read: audio without a "
        "transcript, audio data in a stream (it runs ahead of its transcript), generated images, and any other "
        "base64 or data: URL payload. 'strip' (the default) removes them from the answer and records their "
        "places on the request's span (rsafe.unjudged); 'block' withholds the answer (streamed: cuts it) with "
        "messages.block.output. Every other channel (text, refusals, reasoning, tool calls, audio transcripts, "
        "hosted-tool items) is judged.",
    )
    stream: StreamSettings = StreamSettings()
    reasoning: Reasoning = Reasoning()
    guard: GuardOverrides = GuardOverrides()
    examples: tuple[Example, ...] = ()
    passthrough: tuple[PassthroughRoute, ...] = Field(
        (),
        description="More routes forwarded unscreened for this tenant, e.g. [{method: GET, path: /v1/files}]. "
        "Every /v1 route the proxy neither screens nor passes through answers 404, so nothing reaches the "
        "upstream without a verdict by default.",
    )

    @field_validator("template")
    @classmethod
    def _known_family(cls, template: str) -> str:
        family(template)  # raises ValueError naming the known families
        return template

    @field_validator("input_roles")
    @classmethod
    def _user_judged(cls, roles: tuple[str, ...]) -> tuple[str, ...]:
        if "user" not in roles:
            raise ValueError("must include 'user': the request itself is always judged")
        return roles

    @field_validator("categories")
    @classmethod
    def _unique_ids(cls, categories: tuple[Category, ...]) -> tuple[Category, ...]:
        seen: dict[str, int] = {}
        for index, category in enumerate(categories):
            first = seen.setdefault(category.id.upper(), index)
            if first != index:
                # ids are read from the reasoning without regard to case, so U1 and u1 are the same category
                other = categories[first].id
                case = "" if other == category.id else " (ids are compared without regard to case)"
                raise InvalidPart([index, "id"], f"{category.id!r} is already the id of categories[{other}]{case}")
        return categories

    @functools.cached_property
    def version(self) -> str:
        """A hash of the normalized content: every decision records it. Computed once (the policy is frozen)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with `update`, its version is computed afresh (the cached one belongs to this policy)."""
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("version", None)
        return copy

    def judges_role(self, role: str) -> bool:
        """True when the input screen judges turns of `role` (a role the policy cannot name always is)."""
        return role in self.input_roles or role not in ROLES

    def categories_for(self, side: Side) -> tuple[Category, ...]:
        """The categories screened on `side`."""
        return tuple(category for category in self.categories if category.side.covers(side))

    def category_lines(self, side: Side) -> tuple[CategoryLine, ...]:
        """The category block the guard sees on `side`."""
        return tuple(CategoryLine(c.id, c.name, c.description) for c in self.categories_for(side))
