"""The one small protocol every screened API speaks: where its texts live in a request, an answer and a stream
event, and how to stop or rewrite them. The pipeline and the windowed stream screen ask the dialect a route
gives them, and branch on no API themselves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from rsafe_proxy.errors import ProxyError
from rsafe_proxy.guard.conversation import Turn


class AskedRequest(Protocol):
    """What the pipeline reads of any validated request."""

    @property
    def model(self) -> str:
        """The model asked for."""

    @property
    def stream(self) -> bool | None:
        """Whether the answer is asked for as a stream."""


RequestT = TypeVar("RequestT", bound=AskedRequest)
_R = TypeVar("_R")


@dataclass(frozen=True)
class Validated(Generic[_R]):
    """A request checked for its API: the request, the turns the input screen judges, and the prompt an answer
    replies to (the output screen's `User:` line)."""

    request: _R
    turns: list[Turn]
    prompt: str


@dataclass(frozen=True)
class AnswerTexts:
    """What the guard judges in a complete answer: one text per position (a choice, or the one output),
    the paths of the payloads it cannot read, the positions that held them, and the answer without them (the
    same object when there were none)."""

    texts: list[str]
    unjudged: tuple[str, ...]
    unjudged_at: frozenset[int]
    value: dict[str, Any]


@dataclass(frozen=True)
class EventTexts:
    """What one streamed event adds: (position, text) pairs, the paths of the payloads the guard cannot read,
    and the event without them (None when nothing is left of it)."""

    texts: list[tuple[int, str]]
    unjudged: tuple[str, ...]
    value: dict[str, Any] | None


@dataclass(frozen=True)
class AnswerFacts:
    """What an answer, or one event of a streamed one, says about itself (for telemetry): the model that
    answered, the answer's id, token counts, and the finish reasons it gives (each None or empty where it says
    nothing of it)."""

    model: str | None = None
    response_id: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reasons: tuple[str, ...] = ()


# Token counts by the names either API gives them in `usage` (a later name wins over an earlier one).
_USAGE_KEYS = (
    ("prompt_tokens", "input_tokens"),
    ("input_tokens", "input_tokens"),
    ("completion_tokens", "output_tokens"),
    ("output_tokens", "output_tokens"),
)


def answer_facts(value: Mapping[str, Any], finish_reasons: tuple[str, ...]) -> AnswerFacts:
    """The facts of an answer object (`model`, `id`, `usage`, as both APIs name them) with `finish_reasons`."""
    model, identifier, usage = value.get("model"), value.get("id"), value.get("usage")
    counts: dict[str, int] = {}
    if isinstance(usage, Mapping):
        for key, name in _USAGE_KEYS:
            if isinstance(count := usage.get(key), int) and not isinstance(count, bool):
                counts[name] = count
    return AnswerFacts(
        model=model if isinstance(model, str) else None,
        response_id=identifier if isinstance(identifier, str) else None,
        input_tokens=counts.get("input_tokens"),
        output_tokens=counts.get("output_tokens"),
        finish_reasons=finish_reasons,
    )


class EventReader(Protocol):
    """Reads the events of one stream in order (a dialect may need what earlier events said)."""

    def take(self, data: dict[str, Any]) -> EventTexts:
        """The new text of one event (see EventTexts)."""


class Dialect(Protocol[RequestT]):
    """One API's shapes: request side, answer side, stream side."""

    # the route kind (`rsafe.request.kind`) and the GenAI operation its upstream call is traced as
    name: str
    operation: str
    # the bytes that end its streams ([DONE]; nothing where the last event ends them), and whether a stream is
    # cut short unless its final event came (see ends_stream)
    end_marker: bytes
    strict_end: bool

    # -- request side ---------------------------------------------------------------------------------------

    def validated(self, body: dict[str, Any]) -> Validated[RequestT]:
        """The request checked for the API (InvalidRequest names the first wrong field), its turns and prompt."""

    def acts_upstream(self, body: dict[str, Any]) -> bool:
        """Whether the request makes the provider act while answering (hosted tools, web search, background
        work): it then waits for its input verdict, whatever `input_screening` says."""

    def rewritten(
        self, body: dict[str, Any], request: RequestT, judged: list[Turn], instruction: str
    ) -> dict[str, Any] | None:
        """The body with the judged turns replaced by `instruction`; None when one of them has no replaced form
        (the request is then blocked instead)."""

    # -- answer side ----------------------------------------------------------------------------------------

    def answer(self, value: Any) -> dict[str, Any]:
        """A generated answer the proxy can screen, else UpstreamUnavailable."""

    def stored_answers(self, value: Any) -> list[Any] | None:
        """The answers in a list of stored answers (one page of them), or None when `value` is no such list."""

    def with_answers(self, value: dict[str, Any], answers: list[dict[str, Any]]) -> dict[str, Any]:
        """The list of stored answers `value` (see stored_answers) holding `answers` instead."""

    def stored_body(self, method: str, body: bytes) -> bytes:
        """The body an operation on stored answers sends upstream (InvalidRequest for one it may not send): only
        what the operation takes, so that no prompt rides on it unjudged."""

    def read_answer(self, answer: dict[str, Any]) -> AnswerTexts:
        """Every channel of the answer, by position (UpstreamUnavailable for more choices than one may ask)."""

    def replaced(self, answer: dict[str, Any], reading: AnswerTexts, stops: Mapping[int, str]) -> dict[str, Any]:
        """The answer as stripped in `reading`, each position in `stops` replaced by its message (nothing of
        what it replaces survives)."""

    def facts(self, value: Any) -> AnswerFacts:
        """What `value` (an answer, or one event of a streamed one; anything else says nothing) tells about the
        answer: model, id, usage, finish reasons (see AnswerFacts)."""

    # -- stream side ----------------------------------------------------------------------------------------

    def reader(self) -> EventReader:
        """A reader for the events of one stream."""

    def names_answer(self, data: dict[str, Any]) -> bool:
        """Whether an event, not the stream's first, is the latest word on the answer's metadata (the template
        the proxy's own events are built from)."""

    def choices_of(self, data: dict[str, Any]) -> tuple[set[int], set[int]]:
        """The positions an event speaks of, and those it finishes."""

    def is_final(self, data: dict[str, Any] | None) -> bool:
        """Whether an event ends the answer (held back to the stream's end in async mode)."""

    def ends_stream(self, data: dict[str, Any] | None) -> bool:
        """Whether an event ends the stream itself, as [DONE] does."""

    def cut_events(self, template: dict[str, Any], index: int, message: str) -> list[dict[str, Any]]:
        """The events that end a stream stopped at position `index` with the policy's message (the last one
        then carries the decision id)."""

    def failed_events(
        self, template: dict[str, Any], failure: ProxyError, known: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """The events that end a stream the upstream broke off with `failure`: an error the SDKs raise, its
        error object carrying `known` (the decision id) too."""

    def event_name(self, data: dict[str, Any]) -> str | None:
        """The SSE event name an event is sent under (its `event:` line), or None for an unnamed event."""

    def sequence_of(self, data: dict[str, Any]) -> int | None:
        """The number an event carries in its stream, where the dialect numbers its events; else None."""

    def numbered(self, data: dict[str, Any], number: int) -> dict[str, Any]:
        """The proxy's own event `data` as number `number` of its stream (the same event where the dialect
        numbers none)."""
