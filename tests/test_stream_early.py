"""A streamed answer judged beside the input screen: its windows are read and judged while the input's verdict
is pending, released only after both, and dropped (with their guard calls) when the input is stopped; a stream
whose chunks are never iterated is still closed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import openai
import pytest

from rsafe_proxy.calls import StreamReply
from rsafe_proxy.draining import Drain
from rsafe_proxy.routes import send_reply
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.test_stream_windows import ANSWER, chat_texts, windowed_proxy

pytestmark = pytest.mark.anyio


# -- the input's verdict and the first window's, side by side ----------------------------------------------------


def test_the_first_window_is_judged_while_the_input_verdict_is_pending_and_released_after_both(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> None:
    # the upstream streams at once (asked beside the input screen); the input's verdict takes 0.8 s. The first
    # window's verdict is asked for before the input's comes back, not after it; no text comes out before it
    proxy = windowed_proxy(make_proxy, tmp_path, "chunked")
    upstream.answer, upstream.token_delay_s = ANSWER, 0.002
    guard.delay_s, guard.only_side = 0.8, "input"
    with proxy.client() as client:
        text, first = chat_texts(client, time.monotonic)
    assert text == ANSWER
    asked = {call.side: at for call, at in reversed(list(zip(guard.calls, guard.arrived, strict=True)))}
    assert asked["output"] - asked["input"] < guard.delay_s  # not held back until the input had passed
    assert first is not None and first >= asked["input"] + guard.delay_s  # nothing before the input's verdict


def test_an_input_blocked_while_its_answer_is_judged_stops_that_judging_and_sends_none_of_it(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> None:
    # both verdicts take 1 s; the answer streams at once, so its first window is with the guard when the input's
    # verdict (unsafe) comes: the client gets the block, none of the answer, and that window's call is dropped
    proxy = windowed_proxy(make_proxy, tmp_path, "chunked")
    upstream.answer, upstream.token_delay_s = ANSWER, 0.002
    guard.delay_s = 1.0
    with proxy.client() as client, pytest.raises(openai.BadRequestError) as raised:
        started = time.monotonic()
        with client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": f"tell me {UNSAFE}"}], stream=True
        ) as stream:
            for _ in stream:
                pytest.fail("a blocked request streamed an answer")
    assert raised.value.code == "content_filter"
    assert time.monotonic() - started < 1.8  # the block did not wait for the window's verdict
    assert guard.judged("output")  # the window was asked for while the input was judged...
    deadline = time.monotonic() + 5
    while guard.cancelled < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert guard.cancelled >= 1  # ...and its call dropped when the input was blocked


async def test_a_stream_whose_chunks_are_never_iterated_is_still_closed() -> None:
    # a client gone between the answer's start and its first chunk: the reading begun for its windows (and the
    # request's spans) would otherwise be left running, as nothing ever iterates the chunks to their end
    closed: list[bool] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: {}\n\n"

    async def closing() -> None:
        closed.append(True)

    reply = StreamReply(200, {"content-type": "text/event-stream"}, chunks(), closing=closing)

    async def send(message: MutableMapping[str, Any]) -> None:
        raise OSError("the client is gone")

    with pytest.raises(OSError, match="the client is gone"):
        await send_reply(reply, Drain(), send)
    assert closed == [True]
