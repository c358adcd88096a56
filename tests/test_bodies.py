"""What the guard sees of answers: every text field a client would show, streamed or not, read one way only."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rsafe_proxy.apis.choices import choice_text, delta_text
from rsafe_proxy.bodies import parse_json
from rsafe_proxy.errors import InvalidRequest
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


def _nested_answer(depth: int) -> bytes:
    content = '"\\ud800 half a pair"'
    return b'{"message": {"content": ' + content.encode() + b'}, "x": ' + b"[" * depth + b"]" * depth + b"}"


def test_a_lone_surrogate_is_refused_at_every_depth_json_reads() -> None:
    # the check re-encodes the value a few frames deeper than json.loads reads it: at the one depth where the
    # parse fits the stack and the check does not, the body was let through (then a 500 at the guard call)
    for depth in range(0, 1200, 1):
        with pytest.raises(InvalidRequest):
            parse_json(_nested_answer(depth))


def test_a_surrogate_pair_escaped_in_two_halves_reads_as_its_character() -> None:
    assert parse_json(b'{"text": "\\ud83d\\ude00"}') == {"text": "\U0001f600"}
    assert parse_json(b'{"text": "\\\\ud800"}') == {"text": "\\ud800"}  # an escaped backslash, no surrogate
