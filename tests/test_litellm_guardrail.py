"""LiteLLM's Generic Guardrail API served by the proxy: the contract as LiteLLM 1.108.7 calls it, then the real
LiteLLM proxy using RSafe as its guardrail in front of a fake upstream, through the OpenAI SDK.

The LiteLLM cases need a `litellm` executable (its own venv: `.ci/run` makes `.venv-litellm`); they are
skipped with the reason when there is none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from rsafe_proxy.litellm_api import PATH
from rsafe_proxy.policy.loading import load_policy
from tests.conftest import MakeProxy
from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE, FakeUpstream, ScriptedGuard
from tests.sdk import BLOCKED_INPUT, BLOCKED_OUTPUT, DEFAULT, tenant_policy
from tests.serving import Proxy, unused_url, write_policy

ROOT = Path(__file__).resolve().parent.parent
LITELLM = os.environ.get("RSAFE_LITELLM") or str(ROOT / ".venv-litellm" / "bin" / "litellm")
KEY = "sk-guardrail-tenant"


def check(proxy: Proxy, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    with proxy.http() as http:
        return http.post(PATH, json=body, headers=headers or {})


# -- the API ----------------------------------------------------------------------------------------------------


def test_safe_texts_pass(proxy: Proxy, guard: ScriptedGuard) -> None:
    response = check(proxy, {"input_type": "request", "texts": ["hello"]})
    assert response.status_code == 200
    assert response.json() == {"action": "NONE"}
    assert guard.judged("input") == ["hello"]


def test_an_unsafe_request_is_blocked_with_the_policys_message(proxy: Proxy) -> None:
    response = check(proxy, {"input_type": "request", "texts": [f"{UNSAFE} now"], "litellm_version": "x"})
    assert response.json() == {"action": "BLOCKED", "blocked_reason": BLOCKED_INPUT}


def test_every_message_litellm_sends_is_judged_as_one_conversation(proxy: Proxy, guard: ScriptedGuard) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    texts = ["Be brief.", "an earlier answer", "hi"]
    response = check(proxy, {"input_type": "request", "texts": texts, "structured_messages": messages})
    assert response.json() == {"action": "NONE"}
    assert guard.judged("input") == ["[system] Be brief.\n[assistant] an earlier answer\n[user] hi"]


def test_an_unsafe_response_is_blocked_tool_calls_included(proxy: Proxy, guard: ScriptedGuard) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": f"{UNSAFE}"}}
    response = check(proxy, {"input_type": "response", "texts": [], "tool_calls": [call]})
    assert response.json() == {"action": "BLOCKED", "blocked_reason": BLOCKED_OUTPUT}
    assert guard.judged("output") == [f"lookup({UNSAFE})"]


def test_rewrite_replaces_the_flagged_texts(make_proxy: MakeProxy, tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path, "rewriting", categories=[{"id": "U2", "name": "Weapons & Illegal Tactics", "action": "rewrite"}]
    )
    proxy = tenant_policy(make_proxy, policy)
    messages = load_policy(policy).messages.rewrite
    assert check(proxy, {"input_type": "request", "texts": ["fine"]}).json() == {"action": "NONE"}
    # "fine" is known safe now: only the new turn is judged, and only it is replaced
    request = check(proxy, {"input_type": "request", "texts": ["fine", f"{UNSAFE} please"]})
    assert request.json() == {"action": "GUARDRAIL_INTERVENED", "texts": ["fine", messages.input]}
    answer = check(proxy, {"input_type": "response", "texts": [f"Sure: {UNSAFE}"]})
    assert answer.json() == {"action": "GUARDRAIL_INTERVENED", "texts": [messages.output]}


def test_a_guard_that_is_down_blocks_by_default(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(guard={"url": f"{unused_url()}/v1"})
    response = check(proxy, {"input_type": "request", "texts": ["hello"]})
    assert response.json() == {"action": "BLOCKED", "blocked_reason": DEFAULT.messages.guard_error}


def test_the_tenant_comes_from_litellms_api_key_header(make_proxy: MakeProxy, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "keyed", messages={"block": {"input": "KEYED-BLOCK", "output": "KEYED-OUT"}})
    digest = "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()
    proxy = make_proxy(tenants=[{"id": "keyed", "keys": [digest], "policy": str(policy)}])
    body = {"input_type": "request", "texts": [f"{UNSAFE}"]}
    assert check(proxy, body, {"x-api-key": KEY}).json()["blocked_reason"] == "KEYED-BLOCK"
    assert check(proxy, body, {"x-api-key": "sk-wrong"}).status_code == 401
    assert check(proxy, body).status_code == 401


@pytest.mark.parametrize(
    ("body", "param"), [({"texts": ["hi"]}, "input_type"), ({"input_type": "later"}, "input_type")]
)
def test_a_malformed_call_is_a_clear_400(proxy: Proxy, body: dict[str, Any], param: str) -> None:
    response = check(proxy, body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


# -- the real LiteLLM proxy -------------------------------------------------------------------------------------


@contextmanager
def running_litellm(upstream: FakeUpstream, guardrail: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    """LiteLLM's proxy with `guardrail` on every call (pre- and post-call), in front of the fake upstream."""
    if not Path(LITELLM).is_file():
        pytest.skip(f"no litellm executable at {LITELLM}: set RSAFE_LITELLM, or make .venv-litellm as .ci/run does")
    model = {"model": "openai/fake-model", "api_base": f"{upstream.url}/v1", "api_key": "sk-x"}
    settings = {"mode": ["pre_call", "post_call"], "default_on": True, **guardrail}
    config = {
        "model_list": [{"model_name": "fake-model", "litellm_params": model}],
        "guardrails": [{"guardrail_name": "rsafe", "litellm_params": settings}],
    }
    path = tmp_path / "litellm.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = int(unused_url().rsplit(":", 1)[1])
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_MASTER_KEY="sk-master")
    command = [LITELLM, "--config", str(path), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    log = (tmp_path / "litellm.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"litellm exited: {(tmp_path / 'litellm.log').read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        else:
            pytest.fail("litellm did not start in 120 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def litellm(proxy: Proxy, upstream: FakeUpstream, tmp_path: Path) -> Iterator[str]:
    """RSafe as LiteLLM's generic_guardrail_api (no code)."""
    with running_litellm(upstream, {"guardrail": "generic_guardrail_api", "api_base": proxy.url}, tmp_path) as url:
        yield url


@pytest.fixture
def litellm_python(proxy: Proxy, upstream: FakeUpstream, tmp_path: Path) -> Iterator[str]:
    """RSafe as LiteLLM's Python guardrail (adapters/litellm/rsafe_guardrail.py next to the config)."""
    shutil.copy(ROOT / "adapters" / "litellm" / "rsafe_guardrail.py", tmp_path / "rsafe_guardrail.py")
    guardrail = {"guardrail": "rsafe_guardrail.RSafeGuardrail", "api_base": proxy.url}
    with running_litellm(upstream, guardrail, tmp_path) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="sk-master", max_retries=0)


def test_litellm_passes_a_safe_request_through_rsafe(litellm: str, guard: ScriptedGuard) -> None:
    answer = client(litellm).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.choices[0].message.content == "Echo: hello"
    assert guard.judged("input") == ["hello"]
    assert guard.judged("output") == ["Echo: hello"]


def test_litellm_blocks_an_unsafe_prompt_before_its_upstream(litellm: str, upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as blocked:
        client(litellm).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": UNSAFE}])
    assert BLOCKED_INPUT in str(blocked.value)
    assert upstream.calls("/v1/chat/completions") == []


def test_litellm_stops_an_unsafe_answer(litellm: str, upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as blocked:
        client(litellm).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": f"{ASK_UNSAFE_ANSWER} now"}]
        )
    assert BLOCKED_OUTPUT in str(blocked.value)
    assert UNSAFE not in str(blocked.value)
    assert len(upstream.calls("/v1/chat/completions")) == 1


def test_litellm_keeps_an_unsafe_streamed_answer_from_its_client(litellm: str) -> None:
    text = ""
    try:
        with client(litellm).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": f"{ASK_UNSAFE_ANSWER} now"}], stream=True
        ) as stream:
            for chunk in stream:
                text += "".join(choice.delta.content or "" for choice in chunk.choices)
    except openai.APIError as error:  # should LiteLLM end the stream with an error event instead
        text += str(error)
    # LiteLLM asks every few chunks: what it released before the violation stays, then the policy's message
    assert UNSAFE not in text
    assert text.endswith(BLOCKED_OUTPUT)


# -- the Python guardrail (adapters/litellm/): the proxy's own contract inside LiteLLM ----------------------------


def test_python_guardrail_passes_a_safe_request(litellm_python: str, guard: ScriptedGuard) -> None:
    answer = client(litellm_python).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.choices[0].message.content == "Echo: hello"
    assert guard.judged("input") == ["hello"] and guard.judged("output") == ["Echo: hello"]


def test_python_guardrail_blocks_a_prompt_with_a_content_filter_400(
    litellm_python: str, upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as blocked:
        client(litellm_python).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": UNSAFE}]
        )
    assert BLOCKED_INPUT in str(blocked.value)
    assert "content_filter" in blocked.value.response.text
    assert upstream.calls("/v1/chat/completions") == []


def test_python_guardrail_replaces_an_unsafe_answer(litellm_python: str) -> None:
    raw = client(litellm_python).chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": f"{ASK_UNSAFE_ANSWER} now"}]
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == BLOCKED_OUTPUT
    assert answer.choices[0].finish_reason == "content_filter"
    assert UNSAFE not in raw.http_response.text


@pytest.mark.parametrize("unsafe", [False, True])
def test_python_guardrail_holds_a_stream_until_its_verdict(litellm_python: str, unsafe: bool) -> None:
    prompt = f"{ASK_UNSAFE_ANSWER} now" if unsafe else "hello"
    with client(litellm_python).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": prompt}], stream=True
    ) as stream:
        chunks = list(stream)
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    finish = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    if unsafe:  # the answer is shorter than one window: nothing of it was released
        assert (text, finish) == (BLOCKED_OUTPUT, ["content_filter"])
    else:
        assert text == "Echo: hello"


def _reasoned(reasoning: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": "A plain answer.", "reasoning_content": reasoning}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": "fake-model", "choices": [choice]}


def test_python_guardrail_judges_every_channel_of_an_answer(
    litellm_python: str, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    # the proxy's dialect reads the choice LiteLLM returned: reasoning is judged, not only the content
    upstream.crafted = _reasoned(f"First, {UNSAFE}.")
    raw = client(litellm_python).chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}]
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == BLOCKED_OUTPUT
    assert answer.choices[0].finish_reason == "content_filter"
    assert UNSAFE not in raw.http_response.text
    assert any(UNSAFE in text for text in guard.judged("output"))


def test_python_guardrail_judges_every_channel_of_a_stream(litellm_python: str, upstream: FakeUpstream) -> None:
    chunks = [
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        for delta, finish in [
            ({"role": "assistant", "content": ""}, None),
            ({"reasoning_content": f"I will {UNSAFE}"}, None),
            ({"content": "Fine."}, None),
            ({}, "stop"),
        ]
    ]
    script: list[bytes | float] = [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks]
    upstream.script = [*script, b"data: [DONE]\n\n"]
    with client(litellm_python).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}], stream=True
    ) as stream:
        received = list(stream)
    assert UNSAFE not in json.dumps([chunk.model_dump() for chunk in received])
    assert [choice.finish_reason for chunk in received for choice in chunk.choices if choice.finish_reason] == [
        "content_filter"
    ]
