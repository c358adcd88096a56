"""RSafe Proxy behind LiteLLM's Generic Guardrail API (no code): the real LiteLLM proxy, started with
examples/litellm/generic-api.yaml, in front of a fake upstream, with a real RSafe Proxy and a scripted guard
behind it; seen through the OpenAI SDK. What LiteLLM makes of the proxy's verdicts is LiteLLM's: the README says
what it is, and these tests keep it true."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import MakeProxy
from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE
from tests.fake_upstream import FakeUpstream
from tests.litellm_serving import MODEL, Stack, client, example, litellm_stack, running_litellm, streamed_text, tenant
from tests.sdk import BLOCKED_INPUT, BLOCKED_OUTPUT, DEFAULT
from tests.serving import unused_url

CONFIG = "generic-api.yaml"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with litellm_stack(CONFIG, tmp_path_factory.mktemp("litellm-generic")) as stack:
        yield stack


@pytest.fixture
def stack(shared: Stack) -> Stack:
    return shared.reset()


def ask(url: str, prompt: str) -> Any:
    return client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])


def test_a_safe_request_passes(stack: Stack) -> None:
    assert ask(stack.url, "hello").choices[0].message.content == "Echo: hello"
    assert stack.guard.judged("input") == ["hello"]
    assert stack.guard.judged("output") == ["Echo: hello"]


def test_an_unsafe_prompt_is_litellms_400_before_the_upstream(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as blocked:
        ask(stack.url, f"{UNSAFE} now")
    assert BLOCKED_INPUT in blocked.value.message
    assert blocked.value.code == "400"  # LiteLLM's error body: its status as the code, not content_filter
    assert stack.upstream.calls("/v1/chat/completions") == []


def test_an_unsafe_answer_is_litellms_400(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as blocked:
        ask(stack.url, f"{ASK_UNSAFE_ANSWER} now")
    assert BLOCKED_OUTPUT in blocked.value.message
    assert UNSAFE not in blocked.value.response.text
    assert len(stack.upstream.calls("/v1/chat/completions")) == 1


def test_a_failed_guard_is_litellms_400_with_the_guard_error_message(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = make_proxy(tenants=[tenant()], guard={"url": f"{unused_url()}/v1"})
    with (
        running_litellm(example(CONFIG, tmp_path), proxy.url, upstream) as url,
        pytest.raises(openai.BadRequestError) as failed,
    ):
        ask(url, "hello")
    assert DEFAULT.messages.guard_error in failed.value.message
    assert upstream.calls("/v1/chat/completions") == []


@pytest.mark.parametrize("unsafe", [False, True])
def test_the_example_holds_a_stream_until_its_verdict(stack: Stack, unsafe: bool) -> None:
    text, finish = streamed_text(stack.url, f"{ASK_UNSAFE_ANSWER} now" if unsafe else "hello")
    if unsafe:  # the whole answer was held for one verdict: none of it was sent, the client gets LiteLLM's 400
        assert text == f"[error: Error code: 400 - {BLOCKED_OUTPUT}]"
    else:
        assert (text, finish) == ("Echo: hello", ["stop"])


def _unbuffered(config: dict[str, Any]) -> None:
    del config["guardrails"][0]["litellm_params"]["streaming_buffer_until_moderated"]


def test_without_buffering_unsafe_streamed_text_reaches_the_client(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # LiteLLM's default: chunks are released as they come and every 5th asks for a verdict on the text so far,
    # so what comes before the verdict is the client's. The README says so; this keeps it true.
    upstream.answer = f"Sure: {UNSAFE} and then several more ordinary words follow here."
    proxy = make_proxy(tenants=[tenant()])
    with running_litellm(example(CONFIG, tmp_path, _unbuffered), proxy.url, upstream) as url:
        text, _ = streamed_text(url, "hello")
    assert UNSAFE in text
    assert BLOCKED_OUTPUT in text
