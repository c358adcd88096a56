"""LiteLLM's Generic Guardrail API served by the proxy: the contract as LiteLLM 1.108.7 calls it, and the fields
RSafe's own guardrail reads besides (the proxy's error code and the categories of a block). The real LiteLLM
proxy in front of it: test_litellm_generic.py (no code) and test_litellm_python.py (adapters/litellm/)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from rsafe_proxy.apis.guardrail import PATH
from rsafe_proxy.errors import ContentTooLong
from rsafe_proxy.policy.loading import load_policy
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard
from tests.sdk import BLOCKED_INPUT, BLOCKED_OUTPUT, DEFAULT, tenant_policy
from tests.serving import Proxy, unused_url, write_policy

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
    blocked = {"action": "BLOCKED", "blocked_reason": BLOCKED_INPUT, "code": "content_filter", "categories": ["U2"]}
    assert response.json() == blocked


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
    assert response.json()["blocked_reason"] == BLOCKED_OUTPUT
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
    failed = {"action": "BLOCKED", "blocked_reason": DEFAULT.messages.guard_error, "code": "guard_unavailable"}
    assert response.json() == {**failed, "categories": []}


def test_a_text_too_long_to_judge_is_blocked_with_the_proxys_413_code(
    make_proxy: MakeProxy, guard: ScriptedGuard
) -> None:
    # the proxy answers such a prompt 413 content_too_long; LiteLLM reads an action, and RSafe's guardrail
    # raises the error that code names (adapters/litellm: ContentTooLong, 413)
    proxy = make_proxy(guard={"segment_chars": 1000, "max_segments": 3})
    long_text = " ".join(["alpha bravo charlie"] * 300)  # about 6,000 characters: more than 3 segments
    response = check(proxy, {"input_type": "request", "texts": [long_text]})
    assert response.status_code == 200
    verdict = response.json()
    assert verdict["action"] == "BLOCKED" and verdict["categories"] == []
    assert verdict["code"] == ContentTooLong.code == "content_too_long" and ContentTooLong.status == 413
    assert verdict["blocked_reason"].startswith("The content is too long to screen")
    assert guard.calls == []  # refused before any guard call: nothing of it was judged


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
