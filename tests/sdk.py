"""Helpers for driving the proxy through the OpenAI SDK in tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from rsafe_proxy.policy.loading import load_policy, packaged_policy_path
from tests.conftest import MakeProxy
from tests.serving import Proxy

DEFAULT = load_policy(packaged_policy_path())
BLOCKED_INPUT = DEFAULT.messages.block.input
BLOCKED_OUTPUT = DEFAULT.messages.block.output


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def ask(
    client: openai.OpenAI,
    text: str,
    extra_body: dict[str, Any] | None = None,
    extra_headers: dict[str, str] | None = None,
) -> ChatCompletion:
    return client.chat.completions.create(
        model="fake-model", messages=user(text), extra_body=extra_body, extra_headers=extra_headers
    )


def ask_streamed(client: openai.OpenAI, text: str) -> list[ChatCompletionChunk]:
    with client.chat.completions.create(model="fake-model", messages=user(text), stream=True) as stream:
        return list(stream)


def streamed_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)


def error_of(error: openai.APIStatusError) -> dict[str, Any]:
    body = error.response.json()
    assert isinstance(body, dict)
    inner = body["error"]
    assert isinstance(inner, dict)
    return inner


def wait_until(condition: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


def tenant_policy(make_proxy: MakeProxy, policy: Path, **overrides: Any) -> Proxy:
    """A proxy whose drop-in tenant uses `policy`."""
    return make_proxy(tenants=[{"id": "default", "anonymous": True, "policy": str(policy)}], **overrides)
