"""Answers made of choices (chat completions and completions): where a choice's text lives in an answer and
in a streamed chunk, and the answer and stream side both dialects share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from rsafe_proxy.apis import channels
from rsafe_proxy.apis.dialect import AnswerTexts, EventTexts
from rsafe_proxy.apis.messages import MAX_CHOICES, call_text
from rsafe_proxy.errors import ProxyError, UpstreamUnavailable

# The end of a stream of chunks.
DONE = b"data: [DONE]\n\n"


def read_choice(choice: Any, streamed: bool = False) -> channels.Reading:
    """Every channel of one choice, the message or delta and the choice's own extras: content, refusal,
    reasoning (`reasoning_content`, `reasoning`), tool and function calls, audio transcripts, annotations, and
    any field a provider adds; audio data and other binary payloads are set apart (see channels.read)."""
    return channels.read(choice, call=None if streamed else call_text, streamed=streamed)


def read_extras(answer: dict[str, Any], streamed: bool = False) -> channels.Reading:
    """The text a provider adds to an answer or chunk beside its choices (its value has no `choices`, unless they
    are no list: then they are read as a provider's field)."""
    listed = isinstance(answer.get("choices"), list)
    rest = {key: value for key, value in answer.items() if key != "choices" or not listed}
    return channels.read(rest, call=None if streamed else call_text, streamed=streamed)


def without_extras(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer with only its metadata and choices: what remains when the choice its extras were judged
    with is replaced."""
    return {key: value for key, value in answer.items() if key == "choices" or channels.is_metadata(key, value)}


def choice_text(choice: dict[str, Any]) -> str:
    """The text of one choice of a non-streamed answer, tool calls as `name(arguments)`."""
    return "\n".join(read_choice(choice).texts)


def delta_text(choice: dict[str, Any]) -> str:
    """The text added by one choice of a streamed chunk, tool-call names and arguments included."""
    return "".join(read_choice(choice, streamed=True).texts)


def choice_index(choice: Any) -> int:
    """The index of a choice (0 where it has none or a malformed one, or is no object)."""
    index = choice.get("index") if isinstance(choice, dict) else None
    return index if isinstance(index, int) and not isinstance(index, bool) else 0


def chunk_texts(data: dict[str, Any]) -> EventTexts:
    """(choice index, text) for the text a streamed chunk adds (a provider's extras count for its first
    choice), where its binary payloads were, and the chunk without them (the same object when there were none)."""
    texts: list[tuple[int, str]] = []
    unjudged: list[str] = []
    choices: list[Any] = []
    renumbered = False
    listed = data.get("choices")
    for position, choice in enumerate(listed if isinstance(listed, list) else []):
        reading = read_choice(choice, streamed=True)  # whatever it is: a string choice is text too
        index = choice_index(choice)
        texts.append((index, "".join(reading.texts)))
        unjudged += [f"choices.{position}.{path}" for path in reading.unjudged]
        value = reading.value
        if isinstance(value, dict) and type(value.get("index")) is not int:
            # 1.0, True, "1", none: a client groups it by its own reading, so it gets the one it was judged by
            value, renumbered = {**value, "index": index}, True
        choices.append(value)
    extras = read_extras(data, streamed=True)
    if extras.texts:
        texts.append((texts[0][0] if texts else 0, "".join(extras.texts)))
    unjudged += extras.unjudged
    if not unjudged and not renumbered:
        return EventTexts(texts, (), data)
    rebuilt = {**extras.value, "choices": choices} if isinstance(listed, list) else extras.value
    return EventTexts(texts, tuple(unjudged), rebuilt)


def listed_answers(value: Any) -> list[Any] | None:
    """The items of an OpenAI list object (`object: "list"`, its items in `data`), or None for any other value."""
    if isinstance(value, dict) and value.get("object") == "list" and isinstance(value.get("data"), list):
        return list(value["data"])
    return None


def with_listed(value: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """The list object `value` holding `items` in its `data`."""
    return {**value, "data": items}


def choices_of(data: dict[str, Any]) -> tuple[set[int], set[int]]:
    """The indices of an event's choices, and of those it finishes (a finish_reason)."""
    listed = data.get("choices")
    indices = {choice_index(choice) for choice in listed} if isinstance(listed, list) else set()
    choices = [choice for choice in data.get("choices") or [] if isinstance(choice, dict)]
    return indices, {choice_index(choice) for choice in choices if choice.get("finish_reason")}


class ChunkReader:
    """Reads a stream of chunks: each on its own (a chunk's text is what its deltas add)."""

    def take(self, data: dict[str, Any]) -> EventTexts:
        """The text a chunk adds (see chunk_texts)."""
        return chunk_texts(data)


class ChoicesAnswers(ABC):
    """The answer and stream side of an API whose answers are choices; a subclass says what a stopped choice
    and the chunk that stops a stream look like."""

    end_marker = DONE
    strict_end = False

    @abstractmethod
    def stopped_choice(self, choice: Any, message: str) -> dict[str, Any]:
        """A choice that carries only the policy's message and finish_reason content_filter: nothing of the
        answer it replaces survives (log probabilities, annotations, audio, tool calls, reasoning, extras)."""

    @abstractmethod
    def final_chunk(self, template: dict[str, Any], index: int, message: str) -> dict[str, Any]:
        """A streamed chunk that carries the policy's message and ends the choice with content_filter."""

    # -- answer side ----------------------------------------------------------------------------------------

    def answer(self, value: Any) -> dict[str, Any]:
        """A generated answer the proxy can screen (its choices, a list), else UpstreamUnavailable."""
        if not isinstance(value, dict) or not isinstance(value.get("choices"), list):
            raise UpstreamUnavailable("The upstream model sent an answer the proxy cannot read.")
        return value

    def stored_answers(self, value: Any) -> list[Any] | None:
        """The items of a page of stored answers (see listed_answers)."""
        return listed_answers(value)

    def with_answers(self, value: dict[str, Any], answers: list[dict[str, Any]]) -> dict[str, Any]:
        """The page holding `answers` (see with_listed)."""
        return with_listed(value, answers)

    def stored_body(self, method: str, body: bytes) -> bytes:
        """No body: no operation on stored answers of these APIs takes one, unless a subclass says so."""
        return b""

    def read_answer(self, answer: dict[str, Any]) -> AnswerTexts:
        """One text per choice (a provider's fields beside the choices judged with the first), and the paths of
        the payloads the guard cannot read, choices first named by their position."""
        choices = answer["choices"]
        if len(choices) > MAX_CHOICES:  # each is judged: more would take the shared guard from everyone
            raise UpstreamUnavailable(f"The upstream model sent {len(choices)} choices, more than one may ask for.")
        readings = [read_choice(choice) for choice in choices]  # a choice that is no object is read too
        extras = read_extras(answer)
        texts = ["\n".join(reading.texts) for reading in readings] or [""]
        texts[0] = "\n".join(part for part in (texts[0], *extras.texts) if part)
        inner = (f"choices.{n}.{path}" for n, reading in enumerate(readings) for path in reading.unjudged)
        unjudged = extras.unjudged + tuple(inner)
        at = {n for n, reading in enumerate(readings) if reading.unjudged} | ({0} if extras.unjudged else set())
        if not unjudged:
            return AnswerTexts(texts, (), frozenset(), answer)
        stripped = {**extras.value, "choices": [reading.value for reading in readings]}
        return AnswerTexts(texts, unjudged, frozenset(at), stripped)

    def replaced(self, answer: dict[str, Any], reading: AnswerTexts, stops: Mapping[int, str]) -> dict[str, Any]:
        """The stripped answer, each stopped choice replaced; the extras were judged with the first choice, so
        they go when it is replaced."""
        choices = list(reading.value["choices"])
        for position, message in stops.items():
            if position < len(choices):
                choices[position] = self.stopped_choice(choices[position], message)
        kept = {key: value for key, value in reading.value.items() if key != "choices"}
        return {**(without_extras(answer) if 0 in stops else kept), "choices": choices}

    # -- stream side ----------------------------------------------------------------------------------------

    def reader(self) -> ChunkReader:
        """A reader of chunks."""
        return ChunkReader()

    def names_answer(self, data: dict[str, Any]) -> bool:
        """Never: the first chunk names the answer."""
        return False

    def choices_of(self, data: dict[str, Any]) -> tuple[set[int], set[int]]:
        """See choices_of."""
        return choices_of(data)

    def is_final(self, data: dict[str, Any] | None) -> bool:
        """Whether a chunk finishes a choice (a finish_reason)."""
        if data is None:
            return False
        return any(isinstance(choice, dict) and choice.get("finish_reason") for choice in data.get("choices") or [])

    def ends_stream(self, data: dict[str, Any] | None) -> bool:
        """Never: [DONE] ends a stream of chunks."""
        return False

    def cut_events(self, template: dict[str, Any], index: int, message: str) -> list[dict[str, Any]]:
        """The chunk that carries the policy's message (then [DONE], the end marker)."""
        return [self.final_chunk(template, index, message)]

    def failed_events(
        self, template: dict[str, Any], failure: ProxyError, known: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """The failure's error body, as an event (the SDKs raise it)."""
        body = failure.body()
        return [{**body, "error": {**body["error"], **known}}]

    def event_name(self, data: dict[str, Any]) -> str | None:
        """None: chunks are sent as unnamed events."""
        return None

    def sequence_of(self, data: dict[str, Any]) -> int | None:
        """None: chunks are not numbered."""
        return None

    def numbered(self, data: dict[str, Any], number: int) -> dict[str, Any]:
        """The chunk as it is (chunks are not numbered)."""
        return data


def chunk_base(template: dict[str, Any]) -> dict[str, Any]:
    """What a proxy's own chunk repeats of the stream's first: its id, object, created and model."""
    return {key: template[key] for key in ("id", "object", "created", "model") if key in template}
