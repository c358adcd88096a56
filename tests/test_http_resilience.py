"""The contract when things fail or repeat: guard and upstream failures, cancellation, the verdict cache and
tenants, through the real OpenAI SDK against the proxy on loopback."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from rsafe_proxy.config import Settings
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.sdk import (
    DEFAULT,
    ask,
    ask_streamed,
    error_of,
    streamed_text,
    tenant_policy,
    user,
    wait_until,
)
from tests.serving import Proxy, Servers, proxy_config, serve, start_proxy, unused_url, write_policy

# -- the guard fails -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_guard_down_gives_503(make_proxy: MakeProxy, upstream: FakeUpstream, stream: bool) -> None:
    proxy = make_proxy(guard={"url": f"{unused_url()}/v1"})
    with proxy.client(max_retries=0) as client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="fake-model", messages=user("hello"), stream=stream)
    assert caught.value.status_code == 503
    assert caught.value.code == "guard_unavailable"
    assert error_of(caught.value)["message"] == DEFAULT.messages.guard_error
    assert "Echo" not in caught.value.response.text


def test_guard_stopping_turns_requests_and_readiness_to_503(
    servers: Servers, upstream: FakeUpstream, tmp_path: Path
) -> None:
    double = ScriptedGuard()
    with serve(double.app, lifespan="off") as guard_server:
        config = proxy_config(upstream.url, guard_server.url, tmp_path)
        proxy = start_proxy(servers, Settings.model_validate(config))
        with proxy.client(max_retries=0) as client:
            assert ask(client, "hello").choices[0].message.content == "Echo: hello"
        with proxy.http() as http:
            assert http.get("/readyz").status_code == 200
    with proxy.client(max_retries=0) as client, pytest.raises(openai.InternalServerError) as caught:
        ask(client, "a new question")
    assert caught.value.status_code == 503
    with proxy.http() as http:
        ready = http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["guard"]["ready"] is False


@pytest.mark.parametrize("failure", ["garbage", "status"])
def test_guard_failures_fail_closed_by_default(proxy: Proxy, guard: ScriptedGuard, failure: str) -> None:
    if failure == "garbage":
        guard.garbage = True
    else:
        guard.status = 500
    with proxy.client(max_retries=0) as client, pytest.raises(openai.InternalServerError) as caught:
        ask(client, "hello")
    assert caught.value.status_code == 503
    assert caught.value.code == "guard_unavailable"


def test_guard_failing_on_the_answer_withholds_it(proxy: Proxy, guard: ScriptedGuard) -> None:
    guard.garbage, guard.only_side = True, "output"
    with proxy.client(max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            ask(client, "hello")
        chunks = ask_streamed(client, "hello again")
    assert caught.value.code == "guard_unavailable"
    assert "Echo" not in caught.value.response.text
    assert streamed_text(chunks) == DEFAULT.messages.guard_error
    assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_guard_slower_than_its_timeout_is_cancelled(make_proxy: MakeProxy, guard: ScriptedGuard) -> None:
    proxy = make_proxy(guard={"timeout_s": 0.2})
    guard.delay_s = 5.0
    started = time.monotonic()
    with proxy.client(max_retries=0) as client, pytest.raises(openai.InternalServerError):
        ask(client, "hello")
    assert time.monotonic() - started < 2
    assert wait_until(lambda: guard.cancelled == 1)


def test_guard_garbage_passes_when_the_policy_allows(
    make_proxy: MakeProxy, guard: ScriptedGuard, tmp_path: Path
) -> None:
    proxy = tenant_policy(make_proxy, write_policy(tmp_path, "lenient", on_guard_error="allow"))
    guard.garbage = True
    with proxy.client(max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=user("hello"))
        chunks = ask_streamed(client, "hello again")
    assert raw.parse().choices[0].message.content == "Echo: hello"
    assert raw.headers["x-rsafe-input"] == "guard_error_allow"
    assert streamed_text(chunks) == "Echo: hello again"


# -- the upstream fails ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(429, openai.RateLimitError), (404, openai.NotFoundError), (500, openai.InternalServerError)],
)
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_pass_through(
    proxy: Proxy, upstream: FakeUpstream, status: int, error_type: type[openai.APIStatusError], stream: bool
) -> None:
    body = {"error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    upstream.fail = (status, body)
    with proxy.client(max_retries=0) as client, pytest.raises(error_type) as caught:
        client.chat.completions.create(model="fake-model", messages=user("hello"), stream=stream)
    assert caught.value.status_code == status
    assert caught.value.response.json() == body
    assert caught.value.response.headers["retry-after"] == "7"


def test_upstream_unreachable_is_502(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(upstream={"base_url": f"{unused_url()}/v1"})
    with proxy.client(max_retries=0) as client, pytest.raises(openai.InternalServerError) as caught:
        ask(client, "hello")
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"


# -- cancellation ----------------------------------------------------------------------------------------------


def test_client_disconnect_during_a_stream_cancels_the_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = tenant_policy(
        make_proxy, write_policy(tmp_path, "windows", stream={"window_chars": 16, "overlap_chars": 0})
    )
    upstream.answer = "word " * 400
    upstream.token_delay_s = 0.02  # 8 s if left to finish
    with proxy.client() as client:
        stream = client.chat.completions.create(model="fake-model", messages=user("talk"), stream=True)
        first = next(iter(stream))
        stream.close()
    assert first.choices[0].delta.role == "assistant"
    assert upstream.aborted.wait(3)
    assert upstream.completed == 0


def test_client_disconnect_during_screening_cancels_upstream_and_guard(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    guard.delay_s = 5.0
    upstream.first_byte_delay_s = 5.0
    with proxy.client(max_retries=0, timeout=0.3) as client, pytest.raises(openai.APITimeoutError):
        ask(client, "hello")
    assert upstream.aborted.wait(3)
    assert wait_until(lambda: guard.cancelled == 1, 3)


# -- the verdict cache -----------------------------------------------------------------------------------------


def test_the_same_prompt_twice_calls_the_guard_once(proxy: Proxy, guard: ScriptedGuard) -> None:
    with proxy.client() as client:
        first = ask(client, "hello")
        second = ask(client, "hello")
    assert first.choices[0].message.content == second.choices[0].message.content == "Echo: hello"
    assert guard.judged("input") == ["hello"]
    assert guard.judged("output") == ["Echo: hello"]


def test_a_new_turn_is_judged_with_the_turns_before_it(proxy: Proxy, guard: ScriptedGuard) -> None:
    conversation: list[ChatCompletionMessageParam] = [{"role": "user", "content": "first question"}]
    with proxy.client() as client:
        answer = client.chat.completions.create(model="fake-model", messages=conversation)
        conversation += [
            {"role": "assistant", "content": answer.choices[0].message.content or ""},
            {"role": "user", "content": "second question"},
        ]
        client.chat.completions.create(model="fake-model", messages=conversation)
    # the earlier turns are context (a request split across turns is seen whole), in one guard call
    assert guard.judged("input") == [
        "first question",
        "[user] first question\n[assistant] Echo: first question\n[user] second question",
    ]


def test_an_innocent_turn_judged_with_an_unsafe_one_is_not_blocked_later(proxy: Proxy, guard: ScriptedGuard) -> None:
    conversation: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": f"{UNSAFE} now"},
    ]
    with proxy.client() as client:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="fake-model", messages=conversation)
        assert ask(client, "hello").choices[0].message.content == "Echo: hello"
    assert guard.judged("input") == [f"[user] hello\n[assistant] Hi!\n[user] {UNSAFE} now", "hello"]


def test_an_unsafe_verdict_is_cached_and_still_blocks(proxy: Proxy, guard: ScriptedGuard) -> None:
    with proxy.client() as client:
        for _ in range(2):
            with pytest.raises(openai.BadRequestError):
                ask(client, f"{UNSAFE} again")
    assert len(guard.judged("input")) == 1


# -- tenants ---------------------------------------------------------------------------------------------------


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def tenants(make_proxy: MakeProxy, tmp_path: Path) -> Proxy:
    lenient = write_policy(tmp_path, "lenient", on_guard_error="allow")
    return make_proxy(
        tenants=[
            {"id": "acme", "keys": [digest("sk-acme")]},
            {
                "id": "beta",
                "keys": [digest("sk-beta")],
                "policy": str(lenient),
                "upstream": {"api_key": "sk-beta-upstream"},
            },
        ]
    )


def test_unknown_or_missing_key_is_401(tenants: Proxy, upstream: FakeUpstream, guard: ScriptedGuard) -> None:
    with (
        tenants.client(api_key="sk-nobody", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        ask(client, "hello")
    assert caught.value.code == "invalid_api_key"
    with tenants.http() as http:
        missing = http.post("/v1/chat/completions", json={"model": "m", "messages": user("hello")})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert upstream.calls() == []
    assert guard.calls == []


def test_a_tenants_key_is_never_forwarded(tenants: Proxy, upstream: FakeUpstream) -> None:
    with tenants.client(api_key="sk-acme") as acme:
        raw = acme.chat.completions.with_raw_response.create(model="fake-model", messages=user("hello"))
    with tenants.client(api_key="sk-beta") as beta:
        ask(beta, "hello")
    assert raw.headers["x-rsafe-tenant"] == "acme"
    first, second = upstream.calls()
    assert "authorization" not in first.headers
    assert second.headers["authorization"] == "Bearer sk-beta-upstream"


def test_each_tenant_gets_its_own_policy_and_no_header_picks_another(tenants: Proxy, guard: ScriptedGuard) -> None:
    guard.garbage = True
    with tenants.client(api_key="sk-beta", max_retries=0) as beta:
        assert ask(beta, "hello").choices[0].message.content == "Echo: hello"
    with tenants.client(api_key="sk-acme", max_retries=0) as acme, pytest.raises(openai.InternalServerError):
        ask(acme, "hello", extra_headers={"x-rsafe-tenant": "beta", "x-rsafe-policy": "lenient"})
