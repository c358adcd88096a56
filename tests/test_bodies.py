"""What the guard sees of answers: every text field a client would show, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rsafe_proxy.apis.choices import choice_text, delta_text
from rsafe_proxy.streaming import sse_events


@pytest.mark.parametrize("field", ["content", "reasoning_content", "reasoning", "refusal"])
def test_every_text_field_of_an_answer_is_screened(field: str) -> None:
    assert "bad words" in choice_text({"message": {"role": "assistant", field: "bad words"}})
    assert "bad words" in delta_text({"delta": {field: "bad words"}})


@pytest.mark.anyio
async def test_unreadable_data_events_are_marked_opaque() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'data: {"choices": []}\n\ndata: not json at all\n\n: a comment\n\ndata: [DONE]\n\n'

    events = [event async for event in sse_events(chunks())]
    assert [event.opaque for event in events] == [False, True, False, False]
    assert events[-1].done
