"""The dialect protocol, one table over every API: each dialect finds a text in every channel of its requests,
answers and stream events, and what it puts in place of a stopped answer or stream keeps nothing of it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rsafe_proxy.apis import CHAT, COMPLETIONS, RESPONSES, Dialect
from rsafe_proxy.apis.choices import DONE
from rsafe_proxy.errors import InvalidRequest, UpstreamUnavailable
from rsafe_proxy.guard.conversation import TOOLS

SECRET = "the hidden words"
STOP = "The response was withheld."
DIALECTS: list[Dialect[Any]] = [CHAT, COMPLETIONS, RESPONSES]


def _user(content: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


# (dialect, request body): SECRET in one place the model reads
REQUESTS: list[tuple[Dialect[Any], dict[str, Any]]] = [
    (CHAT, _user(SECRET)),
    (CHAT, _user([{"type": "text", "text": SECRET}])),
    (CHAT, {"model": "m", "messages": [{"role": "tool", "tool_call_id": "c1", "content": SECRET}]}),
    (CHAT, {"model": "m", "messages": [{"role": "assistant", "refusal": SECRET}]}),
    (
        CHAT,
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": SECRET}}],
                }
            ],
        },
    ),
    (CHAT, {**_user("hi"), "chat_template_kwargs": {"note": SECRET}}),
    (CHAT, {**_user("hi"), "tools": [{"type": "function", "function": {"name": "f", "description": SECRET}}]}),
    (COMPLETIONS, {"model": "m", "prompt": SECRET}),
    (COMPLETIONS, {"model": "m", "prompt": ["hi", SECRET]}),
    (COMPLETIONS, {"model": "m", "prompt": "hi", "suffix": SECRET}),
    (RESPONSES, {"model": "m", "input": SECRET}),
    (RESPONSES, {"model": "m", "input": "hi", "instructions": SECRET}),
    (RESPONSES, {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": SECRET}]}]}),
    (RESPONSES, {"model": "m", "input": [{"type": "function_call_output", "call_id": "c1", "output": SECRET}]}),
    (
        RESPONSES,
        {"model": "m", "input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": SECRET}]}]},
    ),
    (RESPONSES, {"model": "m", "input": "hi", "prompt": {"id": "p1", "variables": {"topic": SECRET}}}),
    (RESPONSES, {"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f", "description": SECRET}]}),
]


@pytest.mark.parametrize(("dialect", "body"), REQUESTS)
def test_every_dialect_finds_the_text_of_each_request_channel(dialect: Dialect[Any], body: dict[str, Any]) -> None:
    validated = dialect.validated(body)
    assert SECRET in "\n".join(turn.text for turn in validated.turns)
    rewritable = [turn for turn in validated.turns if turn.role != TOOLS]  # definitions are blocked, not rewritten
    rewritten = dialect.rewritten(body, validated.request, rewritable, STOP)
    if rewritten is not None and not any(turn.role == TOOLS for turn in validated.turns):
        assert SECRET not in json.dumps(rewritten)  # nothing judged survives a rewrite


def _chat(message: dict[str, Any], **extras: Any) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}
    return {"id": "c", "object": "chat.completion", "model": "m", "choices": [choice], **extras}


def _response(*items: dict[str, Any], **extras: Any) -> dict[str, Any]:
    return {"id": "r", "object": "response", "status": "completed", "output": list(items), **extras}


def _message(text: str, part: str = "output_text") -> dict[str, Any]:
    content = {"type": part, part.removeprefix("output_"): text}
    return {"type": "message", "id": "m1", "role": "assistant", "content": [content]}


# (dialect, answer): SECRET in one channel a client would see
ANSWERS: list[tuple[Dialect[Any], dict[str, Any]]] = [
    (CHAT, _chat({"content": SECRET})),
    (CHAT, _chat({"refusal": SECRET})),
    (CHAT, _chat({"reasoning_content": SECRET})),
    (CHAT, _chat({"reasoning": SECRET})),
    (CHAT, _chat({"tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": SECRET}}]})),
    (CHAT, _chat({"function_call": {"name": "f", "arguments": SECRET}})),
    (CHAT, _chat({"audio": {"id": "a", "transcript": SECRET, "data": "AAAA"}})),
    (CHAT, _chat({"content": "hi"}, provider_note=SECRET)),
    (COMPLETIONS, {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": SECRET}]}),
    (RESPONSES, _response(_message(SECRET))),
    (RESPONSES, _response(_message(SECRET, "refusal"))),
    (RESPONSES, _response({"type": "reasoning", "id": "r1", "summary": [{"type": "summary_text", "text": SECRET}]})),
    (RESPONSES, _response({"type": "function_call", "id": "f1", "call_id": "c", "name": "f", "arguments": SECRET})),
    (RESPONSES, _response({"type": "code_interpreter_call", "id": "ci", "code": SECRET})),
    (RESPONSES, _response(_message("hi"), output_text=SECRET)),
]


@pytest.mark.parametrize(("dialect", "answer"), ANSWERS)
def test_every_dialect_finds_the_text_of_each_answer_channel(dialect: Dialect[Any], answer: dict[str, Any]) -> None:
    reading = dialect.read_answer(dialect.answer(answer))
    assert SECRET in "\n".join(reading.texts)
    stopped = dialect.replaced(answer, reading, {0: STOP})
    assert SECRET not in json.dumps(stopped) and STOP in json.dumps(stopped)
    assert dialect.replaced(answer, reading, {}) == answer  # nothing stopped, nothing stripped: as it came


@pytest.mark.parametrize("dialect", DIALECTS)
def test_an_answer_without_its_list_is_refused(dialect: Dialect[Any]) -> None:
    with pytest.raises(UpstreamUnavailable):
        dialect.answer({"id": "x"})


def _chunk(delta: dict[str, Any]) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


# (dialect, events of one stream): SECRET in one channel, in the last event
STREAMS: list[tuple[Dialect[Any], list[dict[str, Any]]]] = [
    (CHAT, [_chunk({"content": SECRET})]),
    (CHAT, [_chunk({"reasoning_content": SECRET})]),
    (CHAT, [_chunk({"refusal": SECRET})]),
    (CHAT, [_chunk({"tool_calls": [{"index": 0, "function": {"arguments": SECRET}}]})]),
    (CHAT, [_chunk({"audio": {"transcript": SECRET}})]),
    (COMPLETIONS, [{"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": SECRET}]}]),
    (RESPONSES, [{"type": "response.output_text.delta", "item_id": "m1", "delta": SECRET}]),
    (RESPONSES, [{"type": "response.reasoning_summary_text.delta", "item_id": "r1", "delta": SECRET}]),
    (RESPONSES, [{"type": "response.output_item.done", "item": _message(SECRET)}]),
    (RESPONSES, [{"type": "response.completed", "response": _response(_message(SECRET))}]),
]


@pytest.mark.parametrize(("dialect", "events"), STREAMS)
def test_every_dialect_finds_the_text_of_each_stream_channel(
    dialect: Dialect[Any], events: list[dict[str, Any]]
) -> None:
    reader = dialect.reader()
    texts = [text for event in events for _, text in reader.take(event).texts]
    assert SECRET in "".join(texts)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_cut_stream_ends_with_the_message_and_the_dialects_end(dialect: Dialect[Any]) -> None:
    events = dialect.cut_events({"id": "c", "response": {"id": "r"}}, 0, STOP)
    assert STOP in json.dumps(events)
    assert dialect.is_final(events[-1]) and dialect.ends_stream(events[-1]) == dialect.strict_end
    assert dialect.end_marker == (b"" if dialect.strict_end else DONE)


# -- the stream's framing: event names and numbers --------------------------------------------------------------

# (dialect, an upstream event, the name it is sent under, the number it carries)
FRAMING: list[tuple[Dialect[Any], dict[str, Any], str | None, int | None]] = [
    (CHAT, {**_chunk({"content": "hi"}), "sequence_number": 4}, None, None),
    (CHAT, {**_chunk({"content": "hi"}), "type": "response.completed"}, None, None),  # a chunk is never named
    (COMPLETIONS, {"object": "text_completion", "choices": [{"index": 0, "text": "hi"}]}, None, None),
    (
        RESPONSES,
        {"type": "response.output_text.delta", "delta": "hi", "sequence_number": 4},
        "response.output_text.delta",
        4,
    ),
    (RESPONSES, {"type": "response.created", "sequence_number": True}, "response.created", None),  # no number
    (RESPONSES, {"delta": "hi"}, None, None),
]


@pytest.mark.parametrize(("dialect", "event", "name", "number"), FRAMING)
def test_each_dialect_names_and_numbers_its_events(
    dialect: Dialect[Any], event: dict[str, Any], name: str | None, number: int | None
) -> None:
    assert dialect.event_name(event) == name
    assert dialect.sequence_of(event) == number


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_proxys_own_events_continue_the_count_where_the_dialect_numbers_them(dialect: Dialect[Any]) -> None:
    event = dialect.cut_events({"id": "c", "response": {"id": "r"}}, 0, STOP)[-1]
    numbered = dialect.numbered(event, 7)
    assert dialect.sequence_of(numbered) == (7 if dialect is RESPONSES else None)
    assert {key: value for key, value in numbered.items() if key != "sequence_number"} == event


# -- stored answers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_page_of_stored_answers_is_read_and_rebuilt_by_the_dialect(dialect: Dialect[Any]) -> None:
    page = {"object": "list", "data": [{"id": "a"}, {"id": "b"}], "has_more": False}
    assert dialect.stored_answers(page) == [{"id": "a"}, {"id": "b"}]
    assert dialect.with_answers(page, [{"id": "x"}]) == {"object": "list", "data": [{"id": "x"}], "has_more": False}
    for one in ({"id": "a", "object": "chat.completion"}, {"object": "list", "data": "no list"}, ["a"], None):
        assert dialect.stored_answers(one) is None


def test_a_stored_chat_completions_update_sends_its_metadata_only() -> None:
    assert CHAT.stored_body("POST", b'{"metadata": {"k": "v"}}') == b'{"metadata":{"k":"v"}}'
    assert CHAT.stored_body("POST", b"{}") == b'{"metadata":null}'
    with pytest.raises(InvalidRequest) as refused:
        CHAT.stored_body("POST", json.dumps({"metadata": {}, "messages": [SECRET], "model": "m"}).encode())
    assert refused.value.param == "messages"  # the first field it may not send, by name
    assert CHAT.stored_body("GET", b'{"messages": []}') == b""


@pytest.mark.parametrize("dialect", [COMPLETIONS, RESPONSES])
def test_other_operations_on_stored_answers_send_no_body(dialect: Dialect[Any]) -> None:
    assert dialect.stored_body("POST", json.dumps({"input": SECRET}).encode()) == b""
