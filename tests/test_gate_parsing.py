"""The gate against parser differentials and side effects: the upstream receives the body the guard judged
(one reading of the bytes, re-encoded), and a request that makes the provider act waits for its verdict."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy

CHAT = "/v1/chat/completions"


def _post(proxy: Proxy, path: str, raw: bytes, content_type: str = "application/json") -> Any:
    with proxy.http() as http:
        return http.post(path, content=raw, headers={"content-type": content_type, "authorization": "Bearer sk-c"})


# Bodies that one JSON reader reads one way and another reader another way (or not at all).
AMBIGUOUS = [
    pytest.param(
        b'{"model":"m","messages":[{"role":"user","content":"hello","content":"' + UNSAFE.encode() + b'"}]}',
        "repeats the key 'content'",
        id="duplicate-key-last-wins-in-python",
    ),
    pytest.param(
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"messages":[{"role":"user","content":"x"}]}',
        "repeats the key 'messages'",
        id="duplicate-top-level-key",
    ),
    pytest.param(b'{"model":"m","temperature":NaN,"messages":[]}', "NaN", id="nan"),
    pytest.param(b'{"model":"m","temperature":-Infinity,"messages":[]}', "Infinity", id="infinity"),
    pytest.param(
        '{"model":"m","messages":[{"role":"user","content":"hi"}]}'.encode("utf-16"), "UTF-8", id="utf-16-guessed"
    ),
    pytest.param(
        b'\xef\xbb\xbf{"model":"m","messages":[{"role":"user","content":"hi"}]}', "not valid JSON", id="utf-8-bom"
    ),
    pytest.param(
        b'{"model":"m","messages":[{"role":"user","content":"\\ud800 ' + UNSAFE.encode() + b'"}]}',
        "unpaired surrogate",
        id="lone-surrogate",
    ),
    pytest.param(b'{"model":"m","x":' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested too deeply", id="deep"),
    pytest.param(b'{"model":"m","seed":' + b"9" * 5000 + b"}", "cannot be read", id="huge-integer"),
]


@pytest.mark.parametrize(("raw", "said"), AMBIGUOUS)
def test_ambiguous_bodies_are_refused_before_the_upstream(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard, raw: bytes, said: str
) -> None:
    response = _post(proxy, CHAT, raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert said in error["message"]
    assert upstream.calls() == [] and guard.calls == []


def test_the_upstream_receives_the_judged_body_re_encoded(proxy: Proxy, upstream: FakeUpstream) -> None:
    # a client's spelling (escapes, spaces, key order) is not what goes upstream: the parsed value is
    raw = b'{ "model" : "m",\n "messages":[{"role":"user","content":"caf\\u00e9 \\"quoted\\""}], "extra": {"a": 1}}'
    response = _post(proxy, CHAT, raw, content_type="text/plain")
    assert response.status_code == 200, response.text
    [sent] = upstream.calls(CHAT)
    assert sent.headers["content-type"] == "application/json"
    assert sent.body == json.loads(raw)
    assert sent.body["messages"][0]["content"] == 'café "quoted"'


HOSTED = [
    pytest.param({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://mcp.example"}]}, id="mcp"),
    pytest.param({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, id="code-interpreter"),
    pytest.param({"tools": [{"type": "web_search"}]}, id="web-search"),
    pytest.param({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, id="file-search"),
    pytest.param({"tools": [{"type": "shell"}]}, id="shell"),
    pytest.param({"background": True}, id="background"),
]


@pytest.mark.parametrize("extra", HOSTED)
def test_a_request_that_makes_the_provider_act_waits_for_its_verdict(
    proxy: Proxy, upstream: FakeUpstream, extra: dict[str, Any]
) -> None:
    # input_screening is parallel by default: without this rule the provider would already be running the tool
    body = {"model": "m", "input": f"please {UNSAFE}", **extra}
    response = _post(proxy, "/v1/responses", json.dumps(body).encode())
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "content_filter"
    assert upstream.calls() == []


def test_chat_web_search_waits_for_its_verdict(proxy: Proxy, upstream: FakeUpstream) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": UNSAFE}], "web_search_options": {}}
    response = _post(proxy, CHAT, json.dumps(body).encode())
    assert response.status_code == 400
    assert upstream.calls() == []


def test_function_tools_are_not_hosted_tools(proxy: Proxy, upstream: FakeUpstream) -> None:
    # a function tool is run by the client after the answer: nothing about it makes the provider act
    body = {"model": "m", "input": "hello", "tools": [{"type": "function", "name": "f", "parameters": {}}]}
    response = _post(proxy, "/v1/responses", json.dumps(body).encode())
    assert response.status_code == 200
    assert len(upstream.calls("/v1/responses")) == 1
