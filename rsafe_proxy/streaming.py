"""Server-sent events from the upstream, screened in windows before they are released to the client.

`chunked` (default): events are held until the text they carry has been judged, one window at a time.
`buffer`: one verdict at the end. `async`: text is released at once and the stream is cut on a violation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rsafe_proxy import responses_api
from rsafe_proxy.bodies import Kind, delta_text, final_chunk
from rsafe_proxy.policy.decide import Decision
from rsafe_proxy.policy.schema import StreamMode, StreamSettings

DONE = b"data: [DONE]\n\n"

# judge(choice index, window text) -> the decision on it
Judge = Callable[[int, str], Awaitable[Decision]]


@dataclass
class Event:
    """One SSE event: its raw bytes, and the JSON it carries (None for [DONE] or comments)."""

    raw: bytes
    data: dict[str, Any] | None
    done: bool = False
    opaque: bool = False


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[Event]:
    """Split a byte stream into SSE events (blank-line separated, CRLF or LF)."""
    buffer = b""
    async for chunk in chunks:
        # normalised after joining: a CRLF split across two reads must not survive as "\r" + "\n"
        buffer = (buffer + chunk).replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            yield _event(raw + b"\n\n")
    if buffer.strip():
        yield _event(buffer.rstrip(b"\n") + b"\n\n")


def _event(raw: bytes) -> Event:
    lines = [line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:")]
    payload = b"\n".join(lines).strip()
    if payload == b"[DONE]":
        return Event(raw, None, done=True)
    try:
        data = json.loads(payload) if payload else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        return Event(raw, data)
    # data the proxy cannot read cannot be judged, so it is never sent (an OpenAI upstream sends none)
    return Event(raw, None, opaque=bool(payload))


def encode(data: dict[str, Any]) -> bytes:
    """One SSE data event (named by its `type`, as the Responses API names its events)."""
    named = f"event: {data['type']}\n".encode() if isinstance(data.get("type"), str) else b""
    return named + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def event_texts(kind: Kind, data: dict[str, Any]) -> list[tuple[int, str]]:
    """(choice index, text) for the text a streamed event adds; the Responses API has one output (index 0)."""
    if kind == "responses":
        return [(0, responses_api.event_text(data))]
    choices = [choice for choice in data.get("choices") or [] if isinstance(choice, dict)]
    return [(int(choice.get("index") or 0), delta_text(kind, choice)) for choice in choices]


def is_final(kind: Kind, data: dict[str, Any] | None) -> bool:
    """Whether an event ends the answer (a finish_reason, or the Responses API's last event)."""
    if data is None:
        return False
    if kind == "responses":
        return data.get("type") in responses_api.FINAL_EVENTS
    return any(isinstance(choice, dict) and choice.get("finish_reason") for choice in data.get("choices") or [])


@dataclass
class _Choice:
    released: str = ""
    pending: str = ""


@dataclass
class WindowedScreen:
    """Holds events back until the text they carry has passed the guard."""

    kind: Kind
    settings: StreamSettings
    judge: Judge
    choices: dict[int, _Choice] = field(default_factory=dict)
    held: list[bytes] = field(default_factory=list)
    template: dict[str, Any] = field(default_factory=dict)
    windows: int = 0

    def _take(self, event: Event) -> None:
        if event.data is None:
            return
        # the first chunk names the answer; a Responses API event with the response object, the latest one
        if not self.template or (self.kind == "responses" and "response" in event.data):
            self.template = event.data
        for index, text in event_texts(self.kind, event.data):
            self.choices.setdefault(index, _Choice()).pending += text

    def _window_full(self) -> bool:
        if self.settings.mode is StreamMode.BUFFER:
            return False
        return any(len(choice.pending) >= self.settings.window_chars for choice in self.choices.values())

    def _window(self) -> dict[int, str]:
        """Take every choice's pending text (with overlap) as the next window to judge."""
        work = {
            index: choice.released[-self.settings.overlap_chars :] + choice.pending
            if self.settings.overlap_chars
            else choice.pending
            for index, choice in self.choices.items()
            if choice.pending.strip()
        }
        for choice in self.choices.values():
            choice.released += choice.pending
            choice.pending = ""
        return work

    async def _judge(self, work: dict[int, str]) -> tuple[int, Decision] | None:
        """Judge a window (see _window); the first failing choice, or None."""
        if not work:
            return None
        self.windows += 1
        decisions = await asyncio.gather(*(self.judge(index, text) for index, text in work.items()))
        for index, decision in zip(work, decisions, strict=True):
            if not decision.outcome.passes:
                return index, decision
        return None

    def _cut(self, index: int, decision: Decision) -> list[bytes]:
        if self.kind == "responses":  # its streams end with their last event, not [DONE]
            return [encode(event) for event in responses_api.stopped_events(self.template, decision.message)]
        return [encode(final_chunk(self.kind, self.template, index, decision.message)), DONE]

    @property
    def _done(self) -> bytes:
        return b"" if self.kind == "responses" else DONE

    async def run(self, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        """The bytes to send to the client, in order, each only after its verdict (chunked/buffer)."""
        if self.settings.mode is StreamMode.ASYNC:
            async for out in self._run_async(events):
                yield out
            return
        async for event in events:
            if event.done:
                break
            if event.opaque:
                continue
            self.held.append(event.raw)
            self._take(event)
            if self._window_full():
                failed = await self._judge(self._window())
                if failed:
                    for out in self._cut(*failed):
                        yield out
                    return
                yield b"".join(self.held)
                self.held.clear()
        failed = await self._judge(self._window())
        if failed:
            for out in self._cut(*failed):
                yield out
            return
        yield b"".join(self.held) + self._done

    async def _run_async(self, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        """Release text at once; judge windows in the background; hold only the end of the stream."""
        checks: list[asyncio.Task[tuple[int, Decision] | None]] = []
        tail: list[bytes] = []
        try:
            async for event in events:
                if event.done:
                    break
                if event.opaque:
                    continue
                for task in checks:
                    if task.done() and (failed := task.result()):
                        for out in self._cut(*failed):
                            yield out
                        return
                self._take(event)
                if is_final(self.kind, event.data):
                    tail.append(event.raw)
                else:
                    yield event.raw
                if self._window_full():  # the window is taken now, not when its task first runs
                    checks.append(asyncio.create_task(self._judge(self._window())))
            checks.append(asyncio.create_task(self._judge(self._window())))
            for task in checks:
                if failed := await task:
                    for out in self._cut(*failed):
                        yield out
                    return
            yield b"".join(tail) + self._done
        finally:
            for task in checks:
                task.cancel()
