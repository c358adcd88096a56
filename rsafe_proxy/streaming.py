"""Server-sent events from the upstream, screened in windows before they are released to the client.

`chunked` (default): events are held until the text they carry has been judged; windows start at about a
sentence and grow (windowplan.py), each judged with the whole answer so far while the upstream keeps
streaming, and released in order once passed. `buffer`: one verdict at the end. `async`: text is released at
once and the stream is cut on a violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rsafe_proxy.apis.dialect import Dialect, EventReader, EventTexts
from rsafe_proxy.apis.messages import MAX_CHOICES
from rsafe_proxy.bodies import read_json
from rsafe_proxy.errors import ContentTooLong, ProxyError, ServerShuttingDown, UpstreamUnavailable
from rsafe_proxy.policy.decide import Decision
from rsafe_proxy.policy.schema import StreamMode, StreamSettings
from rsafe_proxy.windowplan import ChoiceText, WindowPlan

# judge(choice index, window text) -> the decision on it
Judge = Callable[[int, str], Awaitable[Decision]]


# What replaces a comment or a data-less event: it keeps an idle connection alive and carries no text.
KEEP_ALIVE = b":\n\n"
_FIELDS = frozenset({b"data", b"event", b"id", b"retry"})


@dataclass
class Event:
    """One SSE event: its raw bytes, and the JSON it carries (None for [DONE] or comments); `fields`: its lines
    other than data (an event name, an id). The raw bytes are sent as they are only when these say nothing but
    the name the dialect gives the event (see WindowedScreen)."""

    raw: bytes
    data: dict[str, Any] | None
    done: bool = False
    opaque: bool = False
    fields: tuple[bytes, ...] = ()


# One event larger than this is no token stream: an upstream that never ends its event would fill the memory.
MAX_EVENT_BYTES = 16 * 1024 * 1024


async def sse_events(chunks: AsyncIterator[bytes], max_event_bytes: int = MAX_EVENT_BYTES) -> AsyncIterator[Event]:
    """Split a byte stream into SSE events (blank-line separated, CRLF or LF); UpstreamUnavailable for an event
    over `max_event_bytes`."""
    buffer = b""
    async for chunk in chunks:
        # normalised after joining: a CRLF split across two reads must not survive as "\r" + "\n"
        buffer = (buffer + chunk).replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            yield _event(raw + b"\n\n")
        if len(buffer) > max_event_bytes:
            raise UpstreamUnavailable(f"The upstream model sent a stream event over {max_event_bytes} bytes.")
    if buffer.strip():
        yield _event(buffer.rstrip(b"\n") + b"\n\n")


def _event(raw: bytes) -> Event:
    lines = [line for line in raw.split(b"\n") if line and not line.startswith(b":")]
    payload = b"\n".join(line[5:].lstrip() for line in lines if line.startswith(b"data:")).strip()
    others = [line for line in lines if not line.startswith(b"data:")]
    if payload == b"[DONE]":
        return Event(raw, None, done=True)
    data = read_json(payload) if payload else None  # one reading (no repeated keys): the client's, too
    if isinstance(data, dict):
        return Event(raw, data, fields=tuple(others))
    if not payload:
        # a comment, or fields without data; a line that is no SSE field at all is garbage
        return Event(raw, None, opaque=any(line.split(b":", 1)[0] not in _FIELDS for line in others))
    # data the proxy cannot read cannot be judged, so it is never sent (an OpenAI upstream sends none)
    return Event(raw, None, opaque=True)


def encode(data: dict[str, Any], name: str | None = None) -> bytes:
    """One SSE data event, under the event name `name` where there is one."""
    named = f"event: {name}\n".encode() if name is not None else b""
    return named + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


# The choice whose text stops the stream, and the decision that stops it.
_Cut = tuple[int, Decision]
# What an event leaves to hold or release (None: nothing), the cut when the policy blocks what it carried, and
# the (choice index, text) it added.
_Taken = tuple[bytes | None, _Cut | None, list[tuple[int, str]]]


@dataclass
class _Window:
    """Closed text on its way to the client: its events' bytes, released only once `verdict` is None (the window
    passed); `last`: the stream's end comes with it; `template`: the answer's metadata as its events left it."""

    held: list[bytes]
    size: int
    verdict: asyncio.Future[_Cut | None]
    last: bool = False
    template: dict[str, Any] = field(default_factory=dict)


def _settled(value: _Cut | None = None, error: BaseException | None = None) -> asyncio.Future[_Cut | None]:
    future: asyncio.Future[_Cut | None] = asyncio.get_running_loop().create_future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return future


def _drop(verdict: asyncio.Future[_Cut | None]) -> None:
    """Cancel a verdict nobody waits for any more (its guard call with it); one that failed is taken as seen."""
    if verdict.done():
        if not verdict.cancelled():
            verdict.exception()
    else:
        verdict.cancel()


@dataclass
class _Room:
    """The closed windows awaiting release, in order: reading the upstream waits while they are `windows` many or
    hold `bytes` bytes, so a fast upstream and a slow guard cannot fill the memory."""

    windows: int
    bytes: int
    waiting: deque[_Window] = field(default_factory=deque)
    held: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def full(self, more: int = 0) -> bool:
        """Whether the windows waiting (and `more` bytes of the open one) are at a cap."""
        return len(self.waiting) >= self.windows or self.held + more >= self.bytes

    def add(self, window: _Window) -> None:
        self.waiting.append(window)
        self.held += window.size
        self.changed.set()

    def release(self) -> None:
        window = self.waiting.popleft()
        self.held -= window.size
        self.changed.set()

    async def next(self) -> _Window:
        """The oldest window not yet released (waiting for one to close)."""
        while not self.waiting:
            self.changed.clear()
            await self.changed.wait()
        return self.waiting[0]

    async def space(self) -> None:
        """Return once the windows waiting are below both caps."""
        while self.full():
            self.changed.clear()
            await self.changed.wait()


@dataclass
class WindowedScreen:
    """Holds events back until the text they carry has passed the guard.

    The answer is cut into windows (see windowplan.py), each judged with the whole answer so far while the
    upstream keeps streaming: up to `settings.windows_in_flight` windows (and `settings.max_held_bytes` bytes)
    wait for their verdicts at once, and each is released, in order, once it has passed. Consecutive windows
    give the guard the same prompt up to their new text, so an engine's prefix cache reads little more than it.

    Every string of an event is judged (see channels.read); payloads the guard cannot read (audio data, images)
    are stripped, or, when `unjudged` is a decision, cut the stream with it. A stream the upstream breaks off
    (`failure`) still ends cleanly: pending text is judged, and the client gets an error event, not [DONE].
    In buffer mode an answer over `settings.max_held_bytes` is not held further: the stream ends with an error
    event (ContentTooLong, kept as `refused`) and none of the answer, as the guard has judged none of it.
    `decision_id` (the request's, as in the `x-rsafe-decision-id` header) is put in the event that ends a stopped
    stream, as its top-level `decision_id` (the SDKs keep fields they do not know), and in the error object of an
    error ending (`error.decision_id`, as in every error body): a client that logs events, not headers, can still
    look the decision up."""

    dialect: Dialect[Any]
    settings: StreamSettings
    judge: Judge
    unjudged: Decision | None = None
    decision_id: str | None = None
    choices: dict[int, ChoiceText] = field(default_factory=dict)
    template: dict[str, Any] = field(default_factory=dict)
    windows: int = 0  # windows judged (telemetry)
    stripped: list[str] = field(default_factory=list)
    failure: ProxyError | None = None
    refused: ProxyError | None = None  # why the proxy ended the stream itself, unjudged (a buffer over its cap)
    reader: EventReader = field(init=False)
    _ended: bool = False
    _finished: set[int] = field(default_factory=set)
    _indices: set[int] = field(default_factory=set)
    _unreadable: bool = False
    _sequence: int = -1  # the upstream's last event number (a numbered dialect): the proxy's own continue it
    _closed: int = 0  # windows closed: the next one's number in the plan
    _completed: bool = False  # the answer's completion closed a window (see _completes)
    _plan: WindowPlan = field(init=False)
    _shown: dict[str, Any] = field(default_factory=dict)  # the template as of the events released so far
    _events: AsyncIterator[Event] | None = None  # what start took
    running: bool = False  # run has begun: what it releases, and its ending, are its own
    # chunked and buffer mode, once started: the windows closed (in order), and the task reading the upstream
    _filling: tuple[_Room, asyncio.Task[None]] | None = None

    def __post_init__(self) -> None:
        self._plan = WindowPlan(self.settings.first_chars, self.settings.window_chars)
        self.reader = self.dialect.reader()

    def _take(self, event: Event) -> _Taken:
        if event.data is None:  # a comment: its text is never judged, so none of it is sent
            return KEEP_ALIVE, None, []
        read: EventTexts = self.reader.take(event.data)
        texts, unjudged, data = read.texts, read.unjudged, read.value
        if (number := self.dialect.sequence_of(event.data)) is not None:
            self._sequence = max(self._sequence, number)
        if unjudged:
            self.stripped += unjudged
            if self.unjudged is not None:
                return None, (texts[0][0] if texts else 0, self.unjudged), []
        # the first event names the answer, unless the dialect says a later one does
        if data is not None and (not self.template or self.dialect.names_answer(data)):
            self.template = data
        for index, text in texts:
            self.choices.setdefault(index, ChoiceText()).add(text)
        if data is None:
            return None, None, texts
        # sent as received when nothing was stripped and the bytes carry nothing else (an id, a stray line)
        return (event.raw if self._as_received(event, data) else self._encoded(data)), None, texts

    def _as_received(self, event: Event, data: dict[str, Any]) -> bool:
        """Whether `data` is the event's as received, and its lines beside the data are only the name the dialect
        gives it (or none)."""
        if data is not event.data:
            return False
        name = self.dialect.event_name(data)
        named = f"event: {name}".encode() if name is not None else None
        return all(line == named for line in event.fields)

    def _encoded(self, data: dict[str, Any]) -> bytes:
        """`data` as an SSE event, under the name its dialect gives it."""
        return encode(data, self.dialect.event_name(data))

    async def _watched(self, events: AsyncIterator[Event]) -> AsyncGenerator[Event, None]:
        """The upstream's events; its failure is kept (the stream still ends cleanly), and so is a stream that
        stops before its end while it sent data the proxy cannot read (a strict_end dialect: before its last event)."""
        try:
            async for event in events:
                if event.done or self.dialect.ends_stream(event.data):
                    self._ended = True
                elif event.opaque:
                    self._unreadable = True
                elif event.data is not None:
                    indices, finished = self.dialect.choices_of(event.data)
                    self._finished |= finished
                    self._indices |= indices
                    if len(self._indices) > MAX_CHOICES:  # each is judged: more would take the guard from others
                        raise UpstreamUnavailable("The upstream model's stream has more choices than one may ask for.")
                yield event
        except ProxyError as error:
            if not self._complete:
                self.failure = error
            return
        if not self._complete and (self.dialect.strict_end or self._unreadable):
            self.failure = UpstreamUnavailable("The upstream model's stream ended before the answer was complete.")

    @property
    def _complete(self) -> bool:
        """Whether the upstream has sent its whole answer ([DONE], its last event, or every choice finished)."""
        return self._ended or (bool(self._finished) and self._finished >= set(self.choices))

    def _completes(self) -> bool:
        """Whether the event just read completed the answer (true once): its window closes at once, so that its
        verdict need not wait for the stream's end ([DONE], a usage chunk). Anything an upstream sends after it
        still forms a window of its own, judged before it is released."""
        if self._completed or not self._complete:
            return False
        self._completed = True
        return True

    def _closes(self, texts: list[tuple[int, str]]) -> bool:
        """Whether the text an event added completes the open window (see windowplan.py); never in buffer mode."""
        if self.settings.mode is StreamMode.BUFFER:
            return False
        return any(self._plan.closes(self._closed, self.choices[index].size, text) for index, text in texts)

    def _close(self) -> dict[int, str]:
        """Close the open window: every choice it added text to, with its whole answer so far (what is judged)."""
        self._closed += 1
        return {index: answer for index, choice in self.choices.items() if (answer := choice.close()) is not None}

    async def _judge(self, work: dict[int, str]) -> _Cut | None:
        """Judge a window (see _close); the first failing choice, or None."""
        if not work:
            return None
        self.windows += 1
        decisions = await asyncio.gather(*(self.judge(index, text) for index, text in work.items()))
        for index, decision in zip(work, decisions, strict=True):
            if not decision.outcome.passes:
                return index, decision
        return None

    def _closing(self, held: list[bytes], size: int, last: bool = False) -> _Window:
        """The open window closed, its verdict asked for at once."""
        work = self._close()
        verdict = asyncio.ensure_future(self._judge(work)) if work else _settled()
        return _Window(held, size, verdict, last, self.template)

    def _cut(self, index: int, decision: Decision) -> list[bytes]:
        *events, last = self.dialect.cut_events(self.template, index, decision.message)
        out = [self._numbered(event) for event in [*events, self._identified(last)]]
        return [*out, self.dialect.end_marker] if self.dialect.end_marker else out

    def _identified(self, event: dict[str, Any]) -> dict[str, Any]:
        """`event` with the decision id as its top-level `decision_id` (where there is one)."""
        return event if self.decision_id is None else {**event, "decision_id": self.decision_id}

    def _numbered(self, event: dict[str, Any]) -> bytes:
        """`event` encoded, numbered after the upstream's last event where the dialect numbers its events."""
        if self._sequence >= 0:
            self._sequence += 1
            event = self.dialect.numbered(event, self._sequence)
        return self._encoded(event)

    def stop_event(self, message: str) -> bytes | None:
        """What ends the stream when the proxy stops it before its end (a shutdown): the dialect's failure
        events, carrying `message` and the decision id, built from the events released so far (the text held
        back, not judged yet, is never sent); None while none was (the stream has no answer to end yet)."""
        if not self._shown:
            return None
        known = {} if self.decision_id is None else {"decision_id": self.decision_id}
        events = self.dialect.failed_events(self._shown, ServerShuttingDown(message), known)
        return b"".join(self._numbered(event) for event in events)

    def _ending(self) -> bytes:
        """The end of the stream: the dialect's end marker, or, after an upstream failure or a refusal, an error
        the SDKs raise."""
        if (error := self.refused or self.failure) is not None:
            known = {} if self.decision_id is None else {"decision_id": self.decision_id}
            events = self.dialect.failed_events(self.template, error, known)
            return b"".join(self._numbered(event) for event in events)
        return self.dialect.end_marker

    def start(self, events: AsyncIterator[Event]) -> None:
        """Take the upstream's events. In chunked and buffer mode, begin reading and judging them at once, before
        anything is released: the caller may still wait for the input's verdict (`run` releases them after it,
        `stop` drops them). In async mode, whose text goes out as it comes, nothing is read before `run`."""
        self._events = events
        if self.settings.mode is not StreamMode.ASYNC:
            room = _Room(self.settings.windows_in_flight, self.settings.max_held_bytes)
            self._filling = room, asyncio.create_task(self._fill(events, room))

    async def stop(self) -> None:
        """Stop reading and judging: the stream will not be released (the reading and every guard call stop)."""
        if self._filling is not None:
            room, reading = self._filling
            reading.cancel()
            for waiting in room.waiting:
                _drop(waiting.verdict)
            await asyncio.wait([reading])

    async def run(self, events: AsyncIterator[Event] | None = None) -> AsyncIterator[bytes]:
        """The bytes to send to the client, in order, each only after its verdict (chunked/buffer); of `events`,
        or of those `start` took."""
        self.running = True
        if events is not None:
            self.start(events)
        if self.settings.mode is StreamMode.ASYNC and self._events is not None:
            async for out in self._run_async(self._events):
                yield out
            return
        if self._filling is None:
            raise RuntimeError("WindowedScreen.run: no events (neither given nor started)")
        room, reading = self._filling
        try:
            while True:
                window = await room.next()
                failed = await window.verdict
                room.release()
                if failed:
                    reading.cancel()  # nothing after the cut is read, judged or sent
                    for out in self._cut(*failed):
                        yield out
                    return
                if window.last:
                    yield b"".join(window.held) + self._ending()
                    return
                if window.held:
                    self._shown = window.template
                    yield b"".join(window.held)
        finally:  # a cut, or a client that left: the reading and every guard call still running stop
            await self.stop()

    async def _fill(self, events: AsyncIterator[Event], room: _Room) -> None:
        """Read the upstream into windows, each judged as soon as it closes, never waiting for a verdict unless
        the room is full; the last window ends the stream (with the cut an unjudged payload makes, or an error;
        a buffer over its cap is refused)."""
        held: list[bytes] = []
        size = 0
        try:
            async with contextlib.aclosing(self._watched(events)) as source:
                async for event in source:
                    if event.done:
                        break
                    if event.opaque:
                        continue
                    raw, blocked, texts = self._take(event)
                    if blocked:
                        room.add(_Window([], 0, _settled(blocked), last=True))
                        return
                    if raw:
                        held.append(raw)
                        size += len(raw)
                    if size > self.settings.max_held_bytes and self.settings.mode is StreamMode.BUFFER:
                        self.refused = ContentTooLong(
                            f"The answer is longer than the {self.settings.max_held_bytes} bytes a buffered stream "
                            "may hold for its verdict (stream.max_held_bytes); none of it was sent."
                        )
                        room.add(_Window([], 0, _settled(), last=True))  # the held text is dropped, unjudged
                        return
                    chunked = self.settings.mode is StreamMode.CHUNKED
                    if self._completes() or self._closes(texts) or (chunked and room.full(size)):
                        room.add(self._closing(held, size))
                        held, size = [], 0
                    await room.space()
            room.add(self._closing(held, size, last=True))
        except Exception as error:  # handed to the release loop, which raises it
            room.add(_Window([], 0, _settled(error=error), last=True))

    async def _run_async(self, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        """Release text at once; judge windows in the background (at most windows_in_flight at once: reading
        waits for the oldest beyond that); hold only the end of the stream."""
        checks: deque[asyncio.Task[_Cut | None]] = deque()
        tail: list[bytes] = []
        try:
            async with contextlib.aclosing(self._watched(events)) as source:
                async for event in source:
                    if event.done:
                        break
                    if event.opaque:
                        continue
                    for task in checks:  # verdicts that came meanwhile
                        if task.done() and (failed := task.result()):
                            for out in self._cut(*failed):
                                yield out
                            return
                    while checks and checks[0].done():
                        checks.popleft()
                    raw, blocked, texts = self._take(event)
                    if blocked:
                        for out in self._cut(*blocked):
                            yield out
                        return
                    if raw and self.dialect.is_final(event.data):
                        tail.append(raw)
                    elif raw:
                        self._shown = self.template
                        yield raw
                    if self._completes() or self._closes(
                        texts
                    ):  # the window is taken now, not when its task first runs
                        checks.append(asyncio.create_task(self._judge(self._close())))
                    while len(checks) >= self.settings.windows_in_flight:  # back-pressure: the oldest first
                        if failed := await checks[0]:
                            for out in self._cut(*failed):
                                yield out
                            return
                        checks.popleft()
            checks.append(asyncio.create_task(self._judge(self._close())))
            while checks:
                if failed := await checks[0]:
                    for out in self._cut(*failed):
                        yield out
                    return
                checks.popleft()
            yield b"".join(tail) + self._ending()
        finally:
            for task in checks:
                _drop(task)
