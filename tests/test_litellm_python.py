"""The Python guardrail (adapters/litellm/rsafe_guardrail.py) in the real LiteLLM proxy, started with
examples/litellm/python-guardrail.yaml, in front of a fake upstream, with a real RSafe Proxy and a scripted guard
behind it; seen through the OpenAI SDK. The proxy's contract inside LiteLLM: a blocked prompt is a 400
`content_filter`, a failed guard a 503 `guard_unavailable`, a prompt too long to judge a 413 `content_too_long`, a
stopped answer a 200 with the policy's message, and a stream is held back in the proxy's own windows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from rsafe_proxy.policy.loading import load_policy
from tests.conftest import MakeProxy
from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE
from tests.fake_upstream import FakeUpstream
from tests.litellm_serving import (
    MODEL,
    TENANT_KEY,
    Stack,
    client,
    example,
    litellm_stack,
    running_litellm,
    streamed_text,
    tenant,
)
from tests.sdk import BLOCKED_INPUT, BLOCKED_OUTPUT, DEFAULT
from tests.serving import unused_url, write_policy

CONFIG = "python-guardrail.yaml"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with litellm_stack(CONFIG, tmp_path_factory.mktemp("litellm-python")) as stack:
        yield stack


@pytest.fixture
def stack(shared: Stack) -> Stack:
    return shared.reset()


def ask(url: str, prompt: str) -> Any:
    return client(url).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}]
    )


def test_a_safe_request_passes(stack: Stack) -> None:
    guard = stack.guard
    answer = ask(stack.url, "hello").parse()
    assert answer.choices[0].message.content == "Echo: hello"
    assert guard.judged("input") == ["hello"]
    assert guard.judged("output") == ["Echo: hello"]


def test_a_blocked_prompt_is_the_proxys_400_content_filter(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as blocked:
        ask(stack.url, f"{UNSAFE} now")
    error = blocked.value
    assert (error.status_code, error.code, error.type) == (400, "content_filter", "invalid_request_error")
    body = error.response.json()["error"]
    assert body["message"] == BLOCKED_INPUT
    assert body["categories"] == ["U2"]
    assert error.response.headers["x-should-retry"] == "false"
    assert stack.upstream.calls("/v1/chat/completions") == []


def test_a_failed_guard_is_a_503_guard_unavailable(stack: Stack) -> None:
    stack.guard.status = 500
    with pytest.raises(openai.InternalServerError) as failed:
        ask(stack.url, "hello")
    assert (failed.value.status_code, failed.value.code) == (503, "guard_unavailable")
    assert failed.value.response.json()["error"]["message"] == DEFAULT.messages.guard_error
    assert stack.upstream.calls("/v1/chat/completions") == []


def test_a_guard_that_fails_on_the_answer_stops_it(stack: Stack) -> None:
    stack.guard.status, stack.guard.only_side = 500, "output"
    with pytest.raises(openai.InternalServerError) as failed:
        ask(stack.url, "hello")
    assert (failed.value.status_code, failed.value.code) == (503, "guard_unavailable")
    # a stream ends as the proxy ends it: the policy's guard-error message, finish_reason content_filter
    assert streamed_text(stack.url, "hello") == (DEFAULT.messages.guard_error, ["content_filter"])


def test_a_proxy_that_cannot_be_reached_is_a_503_guard_unavailable(upstream: FakeUpstream, tmp_path: Path) -> None:
    with running_litellm(example(CONFIG, tmp_path), unused_url(), upstream) as url:
        with pytest.raises(openai.InternalServerError) as failed:
            ask(url, "hello")
        assert (failed.value.status_code, failed.value.code) == (503, "guard_unavailable")
        text, finish = streamed_text(url, "hello")  # the prompt's screen fails before any byte is sent
    assert text.startswith("[error: Error code: 503")
    assert finish == []
    assert upstream.calls("/v1/chat/completions") == []


def test_a_prompt_too_long_to_judge_is_the_proxys_413_content_too_long(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = make_proxy(tenants=[tenant()], guard={"segment_chars": 1000, "max_segments": 3})
    with (
        running_litellm(example(CONFIG, tmp_path), proxy.url, upstream) as url,
        pytest.raises(openai.APIStatusError) as refused,
    ):
        ask(url, " ".join(["alpha bravo charlie"] * 300))  # about 6,000 characters: more than 3 segments
    assert (refused.value.status_code, refused.value.code) == (413, "content_too_long")
    assert upstream.calls("/v1/chat/completions") == []


def test_a_rewritten_prompt_reaches_the_upstream_as_the_policys_instruction(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path, "rewriting", categories=[{"id": "U2", "name": "Weapons & Illegal Tactics", "action": "rewrite"}]
    )
    instruction = load_policy(policy).messages.rewrite.input
    proxy = make_proxy(tenants=[tenant(policy)])
    with running_litellm(example(CONFIG, tmp_path), proxy.url, upstream) as url:
        answer = ask(url, f"{UNSAFE} please").parse()
    assert answer.choices[0].message.content == f"Echo: {instruction}"
    sent = upstream.calls("/v1/chat/completions")[0].body["messages"]
    assert sent == [{"role": "user", "content": instruction}]


def test_an_unsafe_answer_is_replaced(stack: Stack) -> None:
    raw = ask(stack.url, f"{ASK_UNSAFE_ANSWER} now")
    answer = raw.parse()
    assert raw.http_response.status_code == 200
    assert answer.choices[0].message.content == BLOCKED_OUTPUT
    assert answer.choices[0].finish_reason == "content_filter"
    assert UNSAFE not in raw.http_response.text


def _answer(message: dict[str, Any]) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": MODEL, "choices": [choice]}


_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": f'{{"q": "{UNSAFE}"}}'}}


@pytest.mark.parametrize(
    "message",
    [
        {"content": "A plain answer.", "reasoning_content": f"First, {UNSAFE}."},
        {"content": None, "refusal": f"I refuse, but {UNSAFE}."},
        {"content": None, "tool_calls": [_CALL]},
    ],
    ids=["reasoning_content", "refusal", "tool_call_arguments"],
)
def test_every_channel_of_an_answer_is_judged(stack: Stack, message: dict[str, Any]) -> None:
    stack.upstream.crafted = _answer(message)
    raw = ask(stack.url, "hello")
    answer = raw.parse()
    assert answer.choices[0].message.content == BLOCKED_OUTPUT
    assert answer.choices[0].finish_reason == "content_filter"
    assert not answer.choices[0].message.tool_calls
    assert UNSAFE not in raw.http_response.text
    assert any(UNSAFE in text for text in stack.guard.judged("output"))


@pytest.mark.parametrize("unsafe", [False, True])
def test_a_stream_is_held_until_its_verdict(stack: Stack, unsafe: bool) -> None:
    text, finish = streamed_text(stack.url, f"{ASK_UNSAFE_ANSWER} now" if unsafe else "hello")
    if unsafe:  # the unsafe words are in the first window: nothing of the answer was released
        assert (text, finish) == (BLOCKED_OUTPUT, ["content_filter"])
    else:
        assert (text, finish) == ("Echo: hello", ["stop"])


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": [choice]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


def test_every_channel_of_a_stream_is_judged(stack: Stack) -> None:
    deltas = [{"role": "assistant", "content": ""}, {"reasoning_content": f"I will {UNSAFE}"}, {"content": "Fine."}]
    stack.upstream.script = [*(_chunk(delta) for delta in deltas), _chunk({}, "stop"), b"data: [DONE]\n\n"]
    with httpx.stream(
        "POST",
        f"{stack.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True},
        headers={"authorization": f"Bearer {client(stack.url).api_key}"},
        timeout=30,
    ) as response:
        received = response.read().decode()
    assert UNSAFE not in received
    assert '"finish_reason":"content_filter"' in received.replace(" ", "")


_LONG = " ".join(f"Sentence number {n} says something ordinary about the weather today." for n in range(12))


def test_stream_windows_are_the_proxys_own(stack: Stack) -> None:
    # the same answer streamed through RSafe Proxy itself and through LiteLLM with the guardrail: the guard is
    # asked about the same windows (about a sentence first, then each twice the one before)
    guard = stack.guard
    stack.upstream.answer = _LONG
    with stack.proxy.client(api_key=TENANT_KEY).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], stream=True
    ) as stream:
        direct = "".join(choice.delta.content or "" for chunk in stream for choice in chunk.choices)
    # windows are judged concurrently (stream.windows_in_flight), so the guard may be asked in another order than
    # they closed in; each is the answer so far, so by length is the order they closed in
    proxy_windows = sorted(guard.judged("output"), key=len)
    guard.calls.clear()
    text, finish = streamed_text(stack.url, "weather?")
    assert text == direct == _LONG
    assert finish == ["stop"]
    assert sorted(guard.judged("output"), key=len) == proxy_windows
    sizes = [len(window) for window in proxy_windows]
    assert len(sizes) >= 3 and sizes[0] < 2 * 64 and sizes[-1] == len(_LONG)
