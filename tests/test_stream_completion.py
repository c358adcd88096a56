"""A stream's answer is complete before its stream ends ([DONE] or a usage chunk can come well after the finish
chunk): the window its completion closes is judged then, in every mode, and text an upstream sends after it is
still judged before it goes out. WindowedScreen fed by an upstream that holds its stream's end back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from rsafe_proxy.apis.choices import DONE
from rsafe_proxy.policy.schema import StreamMode
from rsafe_proxy.streaming import sse_events
from tests.doubles import UNSAFE
from tests.test_stream_windows import SENTENCES, GatedJudge, collected, screened, until
from tests.test_streaming import chunk, text_of

pytestmark = pytest.mark.anyio


class HeldEnd:
    """An upstream that sends its chunks, then holds the end of its stream ([DONE]) until `release` is set."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.release = asyncio.Event()

    async def stream(self) -> AsyncIterator[bytes]:
        for piece in self.chunks:
            yield piece
            await asyncio.sleep(0)
        await self.release.wait()
        yield DONE


async def test_the_window_that_completes_the_answer_is_judged_before_the_stream_ends() -> None:
    # the finish chunk completes the answer: its window's verdict need not wait for [DONE] (or a usage chunk)
    judge = GatedJudge(auto=True)
    upstream = HeldEnd([*map(chunk, SENTENCES[:3]), chunk("", finish="stop")])
    stream = screened(judge, first_window_chars=600, window_chars=600).run(sse_events(upstream.stream()))
    async with asyncio.timeout(5):  # before, nothing came until [DONE] did
        released = await anext(stream)  # while [DONE] is still held back
    assert text_of(released) == "".join(SENTENCES[:3]) and judge.judged == ["".join(SENTENCES[:3])]
    upstream.release.set()
    assert (await collected(stream)).endswith(DONE)


async def test_async_mode_asks_for_the_last_verdict_when_the_answer_completes() -> None:
    judge = GatedJudge()
    upstream = HeldEnd([*map(chunk, SENTENCES[:3]), chunk("", finish="stop")])
    stream = screened(judge, mode=StreamMode.ASYNC, first_window_chars=600, window_chars=600).run(
        sse_events(upstream.stream())
    )
    reading = asyncio.ensure_future(collected(stream))
    await until(lambda: len(judge.judged) == 1)  # with [DONE] still held back (before, only after it)
    assert judge.judged == ["".join(SENTENCES[:3])]
    judge.open_all()
    upstream.release.set()
    assert (await reading).endswith(DONE)


async def test_text_sent_after_the_answer_completed_is_judged_before_it_goes_out() -> None:
    judge = GatedJudge()
    late = chunk(f"and then {UNSAFE}")  # a hostile upstream writing on after its finish chunk
    upstream = HeldEnd([chunk(SENTENCES[0]), chunk("", finish="stop"), late])
    stream = screened(judge, first_window_chars=600, window_chars=600).run(sse_events(upstream.stream()))
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: len(judge.judged) == 1)
    judge.open_all()
    assert text_of(await first) == SENTENCES[0]
    upstream.release.set()
    rest = await collected(stream)
    assert UNSAFE not in text_of(rest) and judge.judged[-1].endswith(UNSAFE)
