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
from rsafe_proxy.guard.families import FAMILIES, family
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
    guard_categories: tuple[str, ...] = Field(
        (),
        description="The categories of a guard with its own fixed taxonomy (the qwen3guard family: Violent, "
        "Non-violent Illegal Acts, Sexual Content or Sexual Acts, PII, Suicide & Self-Harm, Unethical Acts, "
        "Politically Sensitive Topics, Copyright Violation, Jailbreak) that this category covers: a verdict "
        "naming one of them is attributed to this category (and decided by its action). A verdict naming only "
        "categories no policy category lists is decided by default_action.",
    )

    @field_validator("guard_categories")
    @classmethod
    def _known_guard_categories(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        known = [name for chosen in FAMILIES.values() for name in chosen.taxonomy]
        for name in names:
            if name not in known:
                raise ValueError(f"{name!r} is no guard's category; known: {', '.join(known)}")
        return names

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
    """Windowed screening of streamed answers (DESIGN §6): windows start at about a sentence and double up to
    `window_chars`; each is judged with the whole answer so far while the upstream keeps streaming."""

    mode: StreamMode = StreamMode.CHUNKED
    first_window_chars: Annotated[int, Field(ge=16, le=1_000_000)] = Field(
        64,
        description="The first window closes at the first sentence end once it holds this many characters (at "
        "twice as many in any case); each next window aims at twice the one before. Where it is larger than "
        "window_chars (an older policy with small windows), window_chars is the first window too.",
    )
    window_chars: Annotated[int, Field(ge=16, le=1_000_000)] = Field(
        600, description="The largest window: windows grow from first_window_chars up to this many characters."
    )
    overlap_chars: Annotated[int, Field(ge=0, le=100_000)] = Field(
        0,
        description="Ignored; accepted so that older policies load. Every window is judged with the whole answer "
        "so far as context, so windows need no overlap.",
    )
    windows_in_flight: Annotated[int, Field(ge=1, le=16)] = Field(
        4,
        description="Windows judged at once while the upstream keeps streaming; with this many awaiting their "
        "verdicts, the proxy stops reading the upstream until the oldest is released (1: read, judge, release).",
    )
    max_held_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = Field(
        1024 * 1024,
        description="Bytes of a streamed answer held back awaiting verdicts. Chunked mode: at this many the open "
        "window is judged at once and the proxy stops reading the upstream until some are released. Buffer "
        "mode: an answer over this many bytes is not judged; the stream ends with a content_too_long error "
        "event and none of the answer is sent.",
    )

    @model_validator(mode="after")
    def _first_within_largest(self) -> Self:
        if "first_window_chars" in self.model_fields_set and self.first_window_chars > self.window_chars:
            raise InvalidPart(["first_window_chars"], "must be at most window_chars")
        return self

    @property
    def first_chars(self) -> int:
        """The first window's size (first_window_chars, at most window_chars)."""
        return min(self.first_window_chars, self.window_chars)


class Reasoning(_Frozen):
    """Where the guard's reasoning trace goes."""

    capture: bool = True
    return_to_client: bool = False


class SideThresholds(_Frozen):
    """A score-mode threshold per side; a side left out keeps the guard's own."""

    input: Annotated[float, Field(gt=0, lt=1)] | None = None
    output: Annotated[float, Field(gt=0, lt=1)] | None = None

    def for_side(self, side: Side, otherwise: float) -> float:
        """The threshold of `side`, or `otherwise` where this names none."""
        chosen = self.input if side is Side.INPUT else self.output
        return otherwise if chosen is None else chosen


class GuardOverrides(_Frozen):
    """Per-policy guard settings; unset ones come from proxy.yaml."""

    max_tokens: Annotated[int, Field(ge=1, le=32_768)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    # score mode: P(unsafe) at or above this is unsafe (one number, or one per side); unset: the guard's own
    score_threshold: Annotated[float, Field(gt=0, lt=1)] | SideThresholds | None = None


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
    controversial: Literal["block", "flag", "allow"] = Field(
        "flag",
        description="What a guard's middle verdict does (the qwen3guard family's 'Safety: Controversial': not "
        "explicitly prohibited, but could be misused or harmful in some contexts). 'block': it counts as unsafe "
        "(Qwen3Guard's strict mode; the named categories' actions apply, else default_action); 'flag' (the "
        "default): the content passes and the decision is recorded as flagged, with the categories the guard "
        "named, so that borderline everyday requests are not refused while their share can be watched; "
        "'allow': it counts as safe (Qwen3Guard's loose mode). Families with a two-level verdict never answer it.",
    )
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
        copy.__dict__.pop("lines_by_side", None)
        copy.__dict__.pop("categories_by_side", None)
        return copy

    def judges_role(self, role: str) -> bool:
        """True when the input screen judges turns of `role` (a role the policy cannot name always is)."""
        return role in self.input_roles or role not in ROLES

    def categories_for(self, side: Side) -> tuple[Category, ...]:
        """The categories screened on `side`."""
        return self.categories_by_side[side]

    @functools.cached_property
    def categories_by_side(self) -> dict[Side, tuple[Category, ...]]:
        """The categories of each side, sorted out once (every screen reads them; the policy is frozen)."""
        return {side: tuple(c for c in self.categories if c.side.covers(side)) for side in Side}

    def guard_category_ids(self, side: Side, names: tuple[str, ...]) -> tuple[str, ...]:
        """The ids of `side`'s categories whose `guard_categories` list any of `names` (the categories a guard
        with its own taxonomy named), in policy order."""
        return tuple(c.id for c in self.categories_for(side) if any(name in c.guard_categories for name in names))

    def category_lines(self, side: Side) -> tuple[CategoryLine, ...]:
        """The category block the guard sees on `side`."""
        return self.lines_by_side[side]

    @functools.cached_property
    def lines_by_side(self) -> dict[Side, tuple[CategoryLine, ...]]:
        """The category block of each side, made once (every guard call renders one; the policy is frozen)."""
        return {
            side: tuple(CategoryLine(c.id, c.name, c.description) for c in self.categories_for(side)) for side in Side
        }
