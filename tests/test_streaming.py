"""SSE parsing and windowed screening of streamed answers: unit tests with a scripted judge, then the three
stream modes end to end through the proxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from rsafe_proxy.apis import CHAT, COMPLETIONS, RESPONSES, Dialect
from rsafe_proxy.apis.choices import DONE
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.policy.decide import Decision, Outcome
from rsafe_proxy.policy.schema import StreamMode, StreamSettings
from rsafe_proxy.streaming import Event, WindowedScreen, sse_events
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.anyio

WITHHELD = "The response was withheld."
# The dialects whose streams are chunks of choices.
Kind = Literal["chat", "completion"]
DIALECTS: dict[Kind, Dialect[Any]] = {"chat": CHAT, "completion": COMPLETIONS}


async def feed(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def events_of(*chunks: bytes) -> list[Event]:
    return [event async for event in sse_events(feed(*chunks))]


def summary(events: Iterable[Event]) -> list[tuple[dict[str, Any] | None, bool]]:
    return [(event.data, event.done) for event in events]


# -- SSE parsing -----------------------------------------------------------------------------------------------

STREAM = b'data: {"a": 1}\n\n: keep-alive\n\ndata: {"b": "x\\ny"}\n\ndata: [DONE]\n\n'
EXPECTED = [({"a": 1}, False), (None, False), ({"b": "x\ny"}, False), (None, True)]


async def test_sse_events_in_one_chunk() -> None:
    events = await events_of(STREAM)
    assert summary(events) == EXPECTED
    assert b"".join(event.raw for event in events) == STREAM


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
async def test_sse_events_split_at_every_byte(newline: bytes) -> None:
    stream = STREAM.replace(b"\n\n", newline * 2).replace(b'"}\n', b'"}' + newline)
    for cut in range(1, len(stream)):
        assert summary(await events_of(stream[:cut], stream[cut:])) == EXPECTED, cut
    assert summary(await events_of(*(stream[i : i + 1] for i in range(len(stream))))) == EXPECTED


async def test_sse_crlf_split_between_cr_and_lf_keeps_events_apart() -> None:
    # a TCP read ending between "\r" and "\n" once merged two events into one unreadable event, whose text
    # was then released without a verdict
    first, second = b'data: {"a": 1}\r\n\r', b'\ndata: {"b": 2}\r\n\r\ndata: [DONE]\r\n\r\n'
    assert summary(await events_of(first, second)) == [({"a": 1}, False), ({"b": 2}, False), (None, True)]


async def test_sse_multiline_data_no_space_and_unterminated_last_event() -> None:
    events = await events_of(b'data:{"a":\ndata: 1}\n\nevent: x\ndata: {"b": 2}')
    assert summary(events) == [({"a": 1}, False), ({"b": 2}, False)]
    assert events[-1].raw.endswith(b"\n\n")


# -- windowed screening ----------------------------------------------------------------------------------------


@dataclass
class Judge:
    """Judges window texts (each the whole answer so far): unsafe iff UNSAFE is in them. `gate`, when set, holds
    every verdict until opened. Records what it was asked (`judged`) and what it passed (`passed`)."""

    judged: list[tuple[int, str]] = field(default_factory=list)
    passed: list[tuple[int, str]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    outcome_on_unsafe: Outcome = Outcome.BLOCK

    async def __call__(self, index: int, text: str) -> Decision:
        self.judged.append((index, text))
        if self.gate is not None:
            await self.gate.wait()
        if UNSAFE in text:
            return Decision(self.outcome_on_unsafe, Side.OUTPUT, ("U2",), WITHHELD)
        self.passed.append((index, text))
        return Decision(Outcome.ALLOW, Side.OUTPUT)

    def text(self, index: int = 0) -> str:
        """The longest text of choice `index` judged so far (each window is judged with the answer before it)."""
        return max((text for judged_index, text in self.judged if judged_index == index), key=len, default="")

    def passed_text(self, index: int = 0) -> str:
        """The longest text of choice `index` that passed."""
        return max((text for passed_index, text in self.passed if passed_index == index), key=len, default="")


def chunk(text: str, index: int = 0, finish: str | None = None, kind: Kind = "chat") -> bytes:
    if kind == "chat":
        choice: dict[str, Any] = {"index": index, "delta": {"content": text}, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text, "finish_reason": finish}
        obj = "text_completion"
    payload = {"id": "cmpl-1", "object": obj, "created": 7, "model": "m", "choices": [choice]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def parsed(out: bytes) -> list[dict[str, Any] | str]:
    """The data of each SSE event in `out` ('[DONE]' as a string)."""
    items: list[dict[str, Any] | str] = []
    for raw in out.split(b"\n\n"):
        if raw.startswith(b"data: "):
            payload = raw[len(b"data: ") :].decode()
            items.append(payload if payload == "[DONE]" else json.loads(payload))
    return items


def text_of(out: bytes, kind: Kind = "chat") -> str:
    pieces = []
    for item in parsed(out):
        if isinstance(item, dict):
            for choice in item["choices"]:
                pieces.append(choice["delta"].get("content") or "" if kind == "chat" else choice["text"])
    return "".join(pieces)


WORDS = [f"word{n:02d} " for n in range(12)]  # 7 characters each


def screen(judge: Judge, mode: StreamMode, kind: Kind = "chat", overlap: int = 0) -> WindowedScreen:
    return WindowedScreen(DIALECTS[kind], StreamSettings(mode=mode, window_chars=16, overlap_chars=overlap), judge)


async def test_chunked_releases_only_judged_text() -> None:
    judge = Judge()
    released = ""
    outputs = []
    async for out in screen(judge, StreamMode.CHUNKED).run(sse_events(feed(*map(chunk, WORDS), DONE))):
        outputs.append(out)
        released += text_of(out)
        assert judge.passed_text().startswith(released)  # nothing goes out ahead of its verdict
    assert released == "".join(WORDS)
    # windows of 3 words (21 characters >= 16), each judged with the whole answer before it
    assert [text for _, text in judge.judged] == ["".join(WORDS[: 3 * n]) for n in range(1, 5)]
    assert outputs[-1].endswith(DONE)
    assert b"".join(outputs).count(DONE) == 1


async def test_chunked_cut_sends_content_filter_then_done() -> None:
    judge = Judge()
    words = [*WORDS[:6], f"{UNSAFE} ", *WORDS[6:]]
    out = b"".join([o async for o in screen(judge, StreamMode.CHUNKED).run(sse_events(feed(*map(chunk, words), DONE)))])
    assert out.endswith(b"\n\n" + DONE)
    *_, final, done = parsed(out)
    assert done == "[DONE]"
    assert final == {
        "id": "cmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": WITHHELD}, "finish_reason": "content_filter"}],
    }
    assert text_of(out) == "".join(WORDS[:6]) + WITHHELD
    assert UNSAFE.encode() not in out
    # the third window fails; the upstream was read on meanwhile (later windows judged too), none released
    assert UNSAFE in judge.judged[2][1] and UNSAFE not in judge.judged[1][1]


async def test_each_window_is_judged_with_the_whole_answer_so_far() -> None:
    judge = Judge()  # an older policy's overlap_chars is accepted and changes nothing
    async for _ in screen(judge, StreamMode.CHUNKED, overlap=5).run(sse_events(feed(*map(chunk, WORDS[:6]), DONE))):
        pass
    first, second = (text for _, text in judge.judged)
    assert first == "".join(WORDS[:3])
    assert second == "".join(WORDS[:6])


async def test_buffer_mode_judges_once_at_the_end() -> None:
    judge = Judge()
    outputs = [o async for o in screen(judge, StreamMode.BUFFER).run(sse_events(feed(*map(chunk, WORDS), DONE)))]
    assert len(outputs) == 1
    assert judge.judged == [(0, "".join(WORDS))]
    assert text_of(outputs[0]) == "".join(WORDS)

    judge = Judge()
    words = [*WORDS, UNSAFE]
    outputs = [o async for o in screen(judge, StreamMode.BUFFER).run(sse_events(feed(*map(chunk, words), DONE)))]
    assert text_of(b"".join(outputs)) == WITHHELD  # nothing of the answer, only the message


async def test_async_mode_releases_first_and_cuts_on_violation() -> None:
    gate = asyncio.Event()
    judge = Judge(gate=gate)
    words = [*WORDS[:6], f"{UNSAFE} ", *WORDS[6:]]
    stream = screen(judge, StreamMode.ASYNC).run(sse_events(feed(*map(chunk, words), chunk("", finish="stop"), DONE)))
    first = await stream.__anext__()
    assert text_of(first) == WORDS[0]  # released before any verdict
    assert judge.judged == []
    gate.set()
    rest = b"".join([out async for out in stream])
    assert rest.endswith(DONE)
    final = parsed(rest)[-2]
    assert isinstance(final, dict)
    assert final["choices"][0]["finish_reason"] == "content_filter"
    assert b'"finish_reason": "stop"' not in rest  # the upstream's own end is held back and dropped


async def test_async_mode_passes_a_safe_stream_whole() -> None:
    judge = Judge()
    source = feed(*map(chunk, WORDS), chunk("", finish="stop"), DONE)
    out = b"".join([o async for o in screen(judge, StreamMode.ASYNC).run(sse_events(source))])
    assert text_of(out) == "".join(WORDS)
    assert parsed(out)[-2] == json.loads(chunk("", finish="stop")[len(b"data: ") :])
    assert judge.text() == "".join(WORDS)


async def test_a_violation_in_one_choice_cuts_that_choice() -> None:
    judge = Judge()
    events = [chunk(word, index=0) + chunk(word.upper(), index=1) for word in WORDS[:3]] + [chunk(UNSAFE, index=1)]
    out = b"".join([o async for o in screen(judge, StreamMode.CHUNKED).run(sse_events(feed(*events, DONE)))])
    final = parsed(out)[-2]
    assert isinstance(final, dict)
    assert final["choices"][0]["index"] == 1
    assert UNSAFE.encode() not in out


async def test_completion_chunks_are_screened() -> None:
    judge = Judge()
    events = [chunk(word, kind="completion") for word in [*WORDS[:3], UNSAFE]]
    out = b"".join(
        [o async for o in screen(judge, StreamMode.CHUNKED, kind="completion").run(sse_events(feed(*events)))]
    )
    final = parsed(out)[-2]
    assert isinstance(final, dict)
    assert final["object"] == "text_completion"
    assert final["choices"][0] == {"index": 0, "text": WITHHELD, "finish_reason": "content_filter"}
    assert UNSAFE not in text_of(out, "completion")


@pytest.mark.parametrize(("outcome", "cut"), [(Outcome.GUARD_ERROR_BLOCK, True), (Outcome.GUARD_ERROR_ALLOW, False)])
async def test_guard_errors_follow_the_decision(outcome: Outcome, cut: bool) -> None:
    judge = Judge(outcome_on_unsafe=outcome)
    out = b"".join([o async for o in screen(judge, StreamMode.CHUNKED).run(sse_events(feed(chunk(UNSAFE), DONE)))])
    assert (UNSAFE.encode() not in out) is cut
    assert out.endswith(DONE)


async def test_a_stream_without_done_still_ends_with_done() -> None:
    judge = Judge()
    out = b"".join([o async for o in screen(judge, StreamMode.CHUNKED).run(sse_events(feed(*map(chunk, WORDS[:2]))))])
    assert out.endswith(DONE)
    assert text_of(out) == "".join(WORDS[:2])


async def test_an_event_goes_out_as_received_only_under_the_name_its_dialect_gives_it() -> None:
    judge = Judge()
    done = {"type": "response.completed", "response": {"id": "r", "object": "response", "output": []}}
    named = b"event: response.completed\ndata: " + json.dumps({**done, "sequence_number": 3}).encode() + b"\n\n"
    out = b"".join([o async for o in WindowedScreen(RESPONSES, StreamSettings(), judge).run(sse_events(feed(named)))])
    assert out == named  # the Responses API names its events by their type: the bytes go out as they came
    # a chunk under a name, even its own `type`: chunks are sent unnamed (a `thread.` name changes what the SDK yields)
    typed = {**json.loads(chunk("Hi")[len(b"data: ") :]), "type": "x"}
    stray = b"event: x\ndata: " + json.dumps(typed).encode() + b"\n\n"
    out = b"".join([o async for o in screen(judge, StreamMode.CHUNKED).run(sse_events(feed(stray, DONE)))])
    assert out.startswith(b"data: ") and b"event:" not in out
    assert text_of(out) == "Hi"


# -- the modes end to end ---------------------------------------------------------------------------------------


def stream_policy(directory: Path, mode: str) -> list[dict[str, Any]]:
    from tests.serving import write_policy

    path = write_policy(directory, f"stream-{mode}", stream={"mode": mode, "window_chars": 16, "overlap_chars": 0})
    return [{"id": "default", "anonymous": True, "policy": str(path)}]


@pytest.mark.parametrize("mode", ["chunked", "buffer", "async"])
def test_stream_modes_through_the_proxy(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, mode: str
) -> None:
    proxy = make_proxy(tenants=stream_policy(tmp_path, mode))
    upstream.answer = "".join(WORDS) + f"{UNSAFE} and the rest."
    with (
        proxy.client() as client,
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "go"}], stream=True
        ) as stream,
    ):
        chunks = list(stream)
    text = "".join(choice.delta.content or "" for piece in chunks for choice in piece.choices)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert text.endswith("The response was withheld because it violated the content policy.")
    outputs = guard.judged("output")
    if mode == "buffer":
        assert outputs == ["".join(WORDS) + f"{UNSAFE} and the rest.".strip()]
        assert not text.startswith("word")
    else:
        assert len(outputs) > 1
        assert text.startswith("word00")
    if mode != "async":
        assert UNSAFE not in text
