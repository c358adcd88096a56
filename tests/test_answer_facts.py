"""What each dialect reads of an answer, or one event of a streamed one, for telemetry (Dialect.facts): the
telemetry package reads none of the APIs' shapes itself."""

from __future__ import annotations

from typing import Any

import pytest

from rsafe_proxy.apis import CHAT, COMPLETIONS, RESPONSES, Dialect
from rsafe_proxy.apis.dialect import AnswerFacts
from rsafe_proxy.telemetry.genai import AnswerReading

CHAT_ANSWER = {
    "id": "chatcmpl-1",
    "model": "m-1",
    "choices": [{"index": 0, "finish_reason": "stop"}, {"index": 1, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
}
RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "model": "m-2",
    "status": "incomplete",
    "incomplete_details": {"reason": "max_output_tokens"},
    "usage": {"input_tokens": 5, "output_tokens": 9},
}


@pytest.mark.parametrize(
    ("dialect", "value", "facts"),
    [
        (CHAT, CHAT_ANSWER, AnswerFacts("m-1", "chatcmpl-1", 7, 3, ("stop", "length"))),
        (
            COMPLETIONS,
            {**CHAT_ANSWER, "object": "text_completion"},
            AnswerFacts("m-1", "chatcmpl-1", 7, 3, ("stop", "length")),
        ),
        (CHAT, {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]}, AnswerFacts(response_id="c")),
        (CHAT, {"usage": {"prompt_tokens": True, "completion_tokens": "3"}}, AnswerFacts()),  # no counts
        (CHAT, None, AnswerFacts()),
        (CHAT, [CHAT_ANSWER], AnswerFacts()),
        (RESPONSES, RESPONSE, AnswerFacts("m-2", "resp_1", 5, 9, ("max_output_tokens",))),
        (
            RESPONSES,
            {"type": "response.completed", "response": {**RESPONSE, "status": "completed", "incomplete_details": None}},
            AnswerFacts("m-2", "resp_1", 5, 9, ("completed",)),
        ),
        (RESPONSES, {"type": "response.output_text.delta", "delta": "hi"}, AnswerFacts()),
        (RESPONSES, CHAT_ANSWER, AnswerFacts("m-1", "chatcmpl-1", 7, 3, ())),  # choices are not its finish reasons
    ],
)
def test_each_dialect_reads_what_an_answer_says_about_itself(
    dialect: Dialect[Any], value: Any, facts: AnswerFacts
) -> None:
    assert dialect.facts(value) == facts


def test_a_reading_keeps_the_latest_of_each_fact_and_every_finish_reason() -> None:
    reading = AnswerReading()
    for event in (
        {"id": "c", "model": "m-1", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
        {"id": "c", "choices": [{"index": 0, "finish_reason": "stop"}]},
        {"id": "c", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
    ):
        reading.read(CHAT.facts(event))
    assert reading.attributes() == {
        "gen_ai.response.model": "m-1",
        "gen_ai.response.id": "c",
        "gen_ai.usage.input_tokens": 4,
        "gen_ai.usage.output_tokens": 2,
        "gen_ai.response.finish_reasons": ["stop"],
    }
