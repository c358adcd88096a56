"""Streamed answers screened in growing, pipelined windows (DESIGN §6, issue 11): the window plan; reading that goes
on while verdicts are pending, within caps; release in order and only after each verdict; each window judged with
the whole answer so far, in guard prompts that share everything up to the new text; then chat and Responses
streams through the proxy in every stream mode."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest

from rsafe_proxy.apis import CHAT
from rsafe_proxy.apis.choices import DONE
from rsafe_proxy.guard.cache import TTLCache
from rsafe_proxy.guard.engine import GuardOutput, Sampling
from rsafe_proxy.guard.families import FAMILIES
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.guard.screen import Screener, ScreenSettings, Verdict
from rsafe_proxy.policy.decide import Decision, Outcome
from rsafe_proxy.policy.loading import load_policy
from rsafe_proxy.policy.schema import StreamMode, StreamSettings
from rsafe_proxy.streaming import WindowedScreen, sse_events
from rsafe_proxy.windowplan import ChoiceText, WindowPlan
from rsafe_proxy.yamlsource import FileInvalid
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import write_policy
from tests.test_streaming import WITHHELD, chunk, parsed, text_of

pytestmark = pytest.mark.anyio

T = TypeVar("T")

# Sentences of 33 characters each (with the space after them).
SENTENCES = [f"This is sentence number {n:02d} here. " for n in range(24)]


# -- the plan ------------------------------------------------------------------------------------------------------


def test_window_targets_double_from_the_first_up_to_the_largest() -> None:
    plan = WindowPlan(64, 600)
    assert [plan.target(number) for number in range(7)] == [64, 128, 256, 512, 600, 600, 600]
    assert plan.target(10_000) == 600
    assert [WindowPlan(16, 16).target(number) for number in range(3)] == [16, 16, 16]


@pytest.mark.parametrize(
    ("number", "size", "added", "closes"),
    [
        (0, 70, "there. ", True),  # past the target, at a sentence end
        (0, 70, "there? ", True),
        (0, 70, "line\n", True),
        (0, 70, "there.", True),  # the event ends with the sentence
        (0, 70, "3.14 ", False),  # a decimal point ends no sentence
        (0, 70, "word ", False),  # past the target, no sentence end yet
        (0, 60, "there. ", False),  # a sentence end before the target
        (0, 128, "word", True),  # twice the target: closed in any case
        (1, 130, "there. ", True),
        (1, 130, "word ", False),
        (4, 600, "word", True),  # at the largest window: closed at once
        (4, 599, "there. ", False),
    ],
)
def test_a_window_closes_at_a_sentence_end_past_its_target_or_at_twice_it(
    number: int, size: int, added: str, closes: bool
) -> None:
    assert WindowPlan(64, 600).closes(number, size, added) is closes


def test_a_plan_needs_a_first_window_within_the_largest() -> None:
    with pytest.raises(ValueError, match="first_chars"):
        WindowPlan(700, 600)
    with pytest.raises(ValueError, match="first_chars"):
        WindowPlan(0, 600)


def test_a_choice_is_judged_whole_at_each_window_that_added_to_it() -> None:
    choice = ChoiceText()
    choice.add("Hello ")
    choice.add("there. ")
    assert choice.size == 13
    assert choice.close() == "Hello there. "  # the first window: what it holds
    assert choice.size == 0 and choice.close() is None  # a window that added nothing is not judged again
    choice.add("  ")
    assert choice.close() is None  # nor one that added only blanks
    choice.add("Bye.")
    assert choice.close() == "Hello there.   Bye."  # each later window: the whole answer so far


def test_stream_settings_keep_older_policies_meaningful(tmp_path: Path) -> None:
    assert StreamSettings().first_chars == 64 and StreamSettings().window_chars == 600
    older = StreamSettings(window_chars=16, overlap_chars=4)  # small windows of an older policy: all 16
    assert older.first_chars == 16
    path = write_policy(tmp_path, "too-large-first", stream={"first_window_chars": 700, "window_chars": 600})
    with pytest.raises(FileInvalid, match=r"stream\.first_window_chars must be at most window_chars"):
        load_policy(path)


# -- windows in the screen, with a scripted judge ------------------------------------------------------------------


@dataclass
class Upstream:
    """Chunks fed to the screen one read at a time; `read` counts those taken."""

    chunks: list[bytes]
    read: int = 0

    @property
    def done(self) -> bool:
        """Whether every chunk was read."""
        return self.read == len(self.chunks)

    async def stream(self) -> AsyncIterator[bytes]:
        for piece in self.chunks:
            self.read += 1
            yield piece
            await asyncio.sleep(0)  # as a socket would, give the loop a turn between reads


@dataclass
class GatedJudge:
    """Judges window texts (unsafe iff UNSAFE is in them), each verdict held until its own gate (one per call, in
    call order) is opened. Records the texts and the calls cancelled."""

    judged: list[str] = field(default_factory=list)
    gates: list[asyncio.Event] = field(default_factory=list)
    cancelled: int = 0
    auto: bool = False  # every gate opens as it is made

    async def __call__(self, index: int, text: str) -> Decision:
        gate = asyncio.Event()
        if self.auto:
            gate.set()
        self.judged.append(text)
        self.gates.append(gate)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if UNSAFE in text:
            return Decision(Outcome.BLOCK, Side.OUTPUT, ("U2",), WITHHELD)
        return Decision(Outcome.ALLOW, Side.OUTPUT)

    def open(self, *numbers: int) -> None:
        for number in numbers:
            self.gates[number].set()

    def open_all(self) -> None:
        """Pass every verdict asked for, and every one asked for from now on."""
        self.auto = True
        for gate in self.gates:
            gate.set()


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait (on the loop) until `condition` holds; fail after `seconds`."""
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.001)


async def settle() -> None:
    """Let every task run as far as it can."""
    await asyncio.sleep(0.05)


def screened(
    judge: Callable[[int, str], Awaitable[Decision]], mode: StreamMode = StreamMode.CHUNKED, **settings: Any
) -> WindowedScreen:
    return WindowedScreen(CHAT, StreamSettings(mode=mode, **settings), judge)


def chat_upstream(texts: list[str]) -> Upstream:
    return Upstream([*map(chunk, texts), chunk("", finish="stop"), DONE])


async def test_windows_grow_from_about_a_sentence_to_the_largest() -> None:
    judge = GatedJudge(auto=True)
    upstream = chat_upstream(SENTENCES)
    out = await collected(screened(judge, first_window_chars=64, window_chars=256).run(sse_events(upstream.stream())))
    answer = "".join(SENTENCES)
    assert text_of(out) == answer
    # each window is judged with the whole answer so far
    assert judge.judged[-1] == answer
    assert all(later.startswith(earlier) for earlier, later in zip(judge.judged, judge.judged[1:], strict=False))
    ends = [len(text) for text in judge.judged]
    sizes = [after - before for before, after in zip([0, *ends], ends, strict=False)]
    # 2 sentences (66 >= 64), 4 (132 >= 128), 8 (264 >= 256), 8 again (at most 256 aimed at), the 2 left
    assert sizes == [66, 132, 264, 264, 66]
    assert all(text.endswith(". ") for text in judge.judged)


async def test_the_screen_keeps_each_choices_text_as_the_window_plans_choice_text() -> None:
    # one home for the per-choice window text: the LiteLLM adapter keeps its choices in the same class
    screen = screened(GatedJudge(auto=True))
    await collected(screen.run(sse_events(chat_upstream(SENTENCES[:3]).stream())))
    assert [type(choice) for choice in screen.choices.values()] == [ChoiceText]
    assert screen.choices[0].closed == "".join(SENTENCES[:3]) and screen.choices[0].size == 0


async def collected(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([out async for out in stream])


async def test_reading_goes_on_while_a_verdict_is_pending() -> None:
    judge = GatedJudge()
    upstream = chat_upstream(SENTENCES[:8])
    stream = screened(judge, first_window_chars=64, window_chars=64, windows_in_flight=16).run(
        sse_events(upstream.stream())
    )
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: upstream.done)  # the whole answer was read while the first verdict was pending
    assert len(judge.judged) == 4  # and every window was asked for at once
    assert not first.done()  # nothing was released before its verdict
    judge.open(0)
    assert text_of(await first) == "".join(SENTENCES[:2])
    judge.open_all()
    rest = await collected(stream)
    assert text_of(rest) == "".join(SENTENCES[2:8]) and rest.endswith(DONE)


async def test_windows_are_released_in_order_each_only_after_its_verdict() -> None:
    judge = GatedJudge()
    upstream = chat_upstream(SENTENCES[:6])
    stream = screened(judge, first_window_chars=64, window_chars=64).run(sse_events(upstream.stream()))
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: len(judge.judged) == 3)
    judge.open(2, 1)  # the later verdicts come first: nothing may go out before the first window's
    await settle()
    assert not first.done()
    judge.open(0)
    outputs = [await first, await anext(stream), await anext(stream)]
    assert [text_of(out) for out in outputs] == ["".join(SENTENCES[n : n + 2]) for n in (0, 2, 4)]


async def test_reading_stops_while_windows_in_flight_wait_for_their_verdicts() -> None:
    judge = GatedJudge()
    upstream = chat_upstream(SENTENCES[:12])
    stream = screened(judge, first_window_chars=64, window_chars=64, windows_in_flight=2).run(
        sse_events(upstream.stream())
    )
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: len(judge.judged) == 2)
    await settle()
    assert len(judge.judged) == 2 and upstream.read == 4  # two windows of two sentences each, then it waits
    judge.open(0)
    assert text_of(await first) == "".join(SENTENCES[:2])
    await until(lambda: len(judge.judged) == 3)  # one released: room for one more window
    await settle()
    assert len(judge.judged) == 3 and upstream.read == 6
    judge.open_all()
    assert text_of(await collected(stream)) == "".join(SENTENCES[2:12])


async def test_reading_stops_at_the_held_bytes_cap() -> None:
    judge = GatedJudge()
    word = "x" * 400 + " "
    upstream = chat_upstream([word] * 10)
    # windows far larger than the answer: only the bytes cap closes one
    settings: dict[str, Any] = {"first_window_chars": 100_000, "window_chars": 100_000, "max_held_bytes": 1024}
    stream = screened(judge, **settings).run(sse_events(upstream.stream()))
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: len(judge.judged) == 1)
    await settle()
    # the events that reach the cap make a window judged at once, and reading waits for its release
    per_window = -(-1024 // len(chunk(word)))
    assert per_window == 2
    assert upstream.read == per_window and len(judge.judged) == 1 and judge.judged[0] == word * per_window
    judge.open(0)
    assert text_of(await first) == word * per_window
    await until(lambda: len(judge.judged) == 2)
    await settle()
    assert upstream.read == 2 * per_window
    judge.open_all()
    assert text_of(await collected(stream)) == word * (10 - per_window)


async def test_an_unsafe_window_stops_the_stream_and_nothing_after_it_goes_out() -> None:
    judge = GatedJudge()
    texts = [*SENTENCES[:3], f"Then {UNSAFE} came. ", *SENTENCES[3:9]]
    upstream = chat_upstream(texts)
    stream = screened(judge, first_window_chars=64, window_chars=64).run(sse_events(upstream.stream()))
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: len(judge.judged) == 4)
    judge.open(2, 1)  # a later window passes, the one with the violation fails: still nothing before the first
    await settle()
    assert not first.done()
    judge.open(0)
    out = await first + await collected(stream)
    assert text_of(out) == "".join(SENTENCES[:2]) + WITHHELD
    *_, final, done = parsed(out)
    assert done == "[DONE]" and isinstance(final, dict)
    assert final["choices"][0]["finish_reason"] == "content_filter"
    assert UNSAFE.encode() not in out and SENTENCES[2].encode() not in out
    # the windows still waiting were called off (the fourth, and any read meanwhile), the upstream read no further
    await until(lambda: judge.cancelled == sum(not gate.is_set() for gate in judge.gates))
    assert judge.cancelled >= 1
    read = upstream.read
    await settle()
    assert upstream.read == read and not upstream.done


async def test_a_client_that_leaves_calls_off_the_pending_verdicts() -> None:
    judge = GatedJudge()
    upstream = chat_upstream(SENTENCES[:8])
    stream = screened(judge, first_window_chars=64, window_chars=64).run(sse_events(upstream.stream()))
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: len(judge.judged) == 4)
    first.cancel()  # the client went away while it waited
    with pytest.raises(asyncio.CancelledError):
        await first
    await stream.aclose()  # type: ignore[attr-defined]
    await until(lambda: judge.cancelled == 4)
    read = upstream.read
    await settle()
    assert upstream.read == read and not upstream.done


async def test_async_mode_releases_at_once_and_waits_for_the_oldest_verdict_beyond_windows_in_flight() -> None:
    judge = GatedJudge()
    upstream = chat_upstream(SENTENCES[:6])
    stream = screened(judge, StreamMode.ASYNC, first_window_chars=64, window_chars=64, windows_in_flight=1).run(
        sse_events(upstream.stream())
    )
    released = text_of(await anext(stream)) + text_of(await anext(stream))
    assert released == "".join(SENTENCES[:2]) and judge.judged == []  # before any verdict
    pending = asyncio.ensure_future(anext(stream))
    await until(lambda: len(judge.judged) == 1)
    await settle()
    assert not pending.done() and upstream.read == 2  # one window in flight: reading waits for its verdict
    judge.open(0)
    assert text_of(await pending) == SENTENCES[2]
    judge.open_all()
    out = await collected(stream)
    assert text_of(out) == "".join(SENTENCES[3:6]) and out.endswith(DONE)
    assert judge.judged[-1] == "".join(SENTENCES[:6])


# -- the guard prompts of consecutive windows ----------------------------------------------------------------------


@dataclass
class PromptRecorder:
    """A guard engine that answers safe and records every prompt it is given."""

    name: str = "recorder"
    prompts: list[str] = field(default_factory=list)

    async def complete(
        self, prompt: str, sampling: Sampling, system: str | None = None, *, cache_salt: str = "", requester: str = ""
    ) -> GuardOutput:
        self.prompts.append(prompt)
        return GuardOutput("<think>fine</think> \\boxed{safe}", completion_tokens=4)

    async def start(self) -> None:
        """Nothing to load."""

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        """Nothing held."""


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_consecutive_windows_share_their_guard_prompt_up_to_the_new_text(family: str) -> None:
    """The prompt of a window is the previous window's, byte for byte, up to where the previous answer ended:
    an engine's prefix cache reads only the new text and the template's end again."""
    engine = PromptRecorder()
    screener = Screener(engine, ScreenSettings(template=family), TTLCache[Verdict](0, 60))
    policy = load_policy(Path(__file__).parent.parent / "rsafe_proxy" / "policies" / "rsafe-default.yaml")
    prompt = "Tell me about the café by the river, in a few sentences."
    pieces = ["".join(SENTENCES[:2]), "Crème brûlée is served at the café. ", "".join(SENTENCES[2:6]), "End.\n"]
    answers = ["".join(pieces[: n + 1]) for n in range(len(pieces))]
    for answer in answers:
        await screener.screen(policy, Side.OUTPUT, prompt, answer, tenant="t")
    assert len(engine.prompts) == len(answers)
    for before, after, answer in zip(engine.prompts, engine.prompts[1:], answers, strict=False):
        shared = before.index(answer.rstrip()) + len(answer.rstrip())  # the previous prompt up to its answer's end
        assert after[:shared] == before[:shared]
        assert len(before) - shared < 700  # only the template's end follows the answer


# -- through the proxy ---------------------------------------------------------------------------------------------

ANSWER = "".join(SENTENCES[:12])  # 420 characters, about 80 words at most


def windowed_proxy(make_proxy: MakeProxy, tmp_path: Path, mode: str) -> Any:
    path = write_policy(tmp_path, f"grow-{mode}", stream={"mode": mode})  # the default plan: 64 up to 600
    return make_proxy(tenants=[{"id": "default", "anonymous": True, "policy": str(path)}])


def chat_texts(client: openai.OpenAI, seen: Callable[[], T]) -> tuple[str, T | None]:
    """The streamed text, and `seen()` when its first text arrived."""
    text, first = "", None
    with client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "tell"}], stream=True
    ) as stream:
        for piece in stream:
            for choice in piece.choices:
                if choice.delta.content:
                    first = seen() if first is None else first
                    text += choice.delta.content
    return text, first


def _responses_texts(client: openai.OpenAI, seen: Callable[[], T]) -> tuple[str, T | None]:
    text, first = "", None
    with client.responses.create(model="fake-model", input="tell", stream=True) as stream:
        for event in stream:
            if event.type == "response.output_text.delta" and event.delta:
                first = seen() if first is None else first
                text += event.delta
    return text, first


READERS = {"chat": chat_texts, "responses": _responses_texts}


@pytest.mark.parametrize("api", sorted(READERS))
@pytest.mark.parametrize("mode", ["chunked", "buffer", "async"])
def test_streams_are_judged_in_growing_windows_with_the_whole_answer_so_far(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, mode: str, api: str
) -> None:
    proxy = windowed_proxy(make_proxy, tmp_path, mode)
    upstream.answer, upstream.token_delay_s = ANSWER, 0.01
    guard.delay_s, guard.only_side = (0.8 if mode == "chunked" else 0.3), "output"  # a slow guard on the output side
    with proxy.client() as client:
        text, asked = READERS[api](client, lambda: len(guard.judged("output")))
    assert text == ANSWER
    judged = sorted(guard.judged("output"), key=len)
    if mode == "buffer":
        assert judged == [ANSWER.strip()]
        return
    # 2 sentences, then 4, then 6 (the rest): each window judged with the whole answer before it
    assert judged == ["".join(SENTENCES[:n]).strip() for n in (2, 6, 12)]
    if mode == "chunked":
        # pipelined: the second window was asked for before the first verdict came back (about 0.25 s of upstream
        # text later, not after the guard's 0.8 s), and when the first text came out the guard had both
        arrived = [at for call, at in zip(guard.calls, guard.arrived, strict=True) if call.side == "output"]
        assert arrived[1] - arrived[0] < guard.delay_s
        assert asked is not None and asked >= 2
        prompts = sorted((call.prompt for call in guard.calls if call.side == "output"), key=len)
        for before, after, answer in zip(prompts, prompts[1:], judged, strict=False):
            shared = before.index(answer) + len(answer)
            assert after[:shared] == before[:shared]  # byte for byte up to the new text


@pytest.mark.parametrize("api", sorted(READERS))
def test_an_unsafe_window_mid_stream_stops_the_release(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, api: str
) -> None:
    proxy = windowed_proxy(make_proxy, tmp_path, "chunked")
    upstream.answer = "".join(SENTENCES[:2]) + f"Then {UNSAFE} came. " + "".join(SENTENCES[2:12])
    upstream.token_delay_s = 0.005
    with proxy.client() as client:
        text, _ = READERS[api](client, lambda: 0)
    message = load_policy(tmp_path / "grow-chunked.yaml").messages.block.output
    assert text == "".join(SENTENCES[:2]) + message
    assert UNSAFE not in text


def test_the_policy_schema_describes_the_window_plan() -> None:
    schema = json.loads((Path(__file__).parent.parent / "policies" / "policy.schema.json").read_text())
    fields = schema["$defs"]["StreamSettings"]["properties"]
    assert {"first_window_chars", "window_chars", "windows_in_flight", "max_held_bytes"} <= set(fields)
    assert "Ignored" in fields["overlap_chars"]["description"]
