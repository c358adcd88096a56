"""Which routes the gate serves (issue 9), tried as an attacker would: every operation that returns stored
generated content (a response cancelled, a completion's metadata updated) screens its output again; routes that
generate and cannot be screened are 404 even against a lenient upstream; the pass-through allow-list, a policy's
extension of it, and headers that would reroute a request upstream. Path spellings, credentials and admin
endpoints: test_gate_routing.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

from rsafe_proxy.policy.schema import Policy
from tests.conftest import MakeProxy
from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.sdk import BLOCKED_OUTPUT, ask
from tests.serving import Proxy, write_policy
from tests.test_gate_routing import KEY, chat_body, sha

# -- stored generated content: every operation that returns it is screened; the routes that are not served -------


def test_a_cancelled_response_is_screened(proxy: Proxy, upstream: FakeUpstream) -> None:
    with proxy.client() as client:
        made = client.responses.create(model="fake-model", input=f"{ASK_UNSAFE_ANSWER} now")
        raw = client.responses.with_raw_response.cancel(made.id)
    assert raw.parse().output_text == BLOCKED_OUTPUT
    assert UNSAFE not in raw.http_response.text
    assert [call.method for call in upstream.calls(f"/v1/responses/{made.id}/cancel")] == ["POST"]
    assert UNSAFE in str(upstream.stored[made.id])


def test_a_completions_metadata_update_is_screened(proxy: Proxy, upstream: FakeUpstream) -> None:
    with proxy.client() as client:
        made = ask(client, f"{ASK_UNSAFE_ANSWER} now")
        raw = client.chat.completions.with_raw_response.update(made.id, metadata={"topic": "x"})
    assert raw.parse().choices[0].message.content == BLOCKED_OUTPUT
    assert UNSAFE not in raw.http_response.text
    [update] = [call for call in upstream.calls(f"/v1/chat/completions/{made.id}") if call.method == "POST"]
    assert update.body == {"metadata": {"topic": "x"}}


UNSCREENABLE: list[tuple[str, str]] = [
    ("GET", "/v1/chat/completions/cmpl-fake/messages"),
    ("GET", "/v1/responses/resp_fake/input_items"),
    ("POST", "/v1/responses/compact"),
    ("POST", "/v1/responses/resp_fake"),
    ("PATCH", "/v1/responses/resp_fake"),
    ("POST", "/v1/conversations"),
    ("GET", "/v1/conversations/conv_1/items"),
    ("POST", "/v1/conversations/conv_1/items"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/edits"),
    ("POST", "/v1/audio/speech"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/translations"),
    ("GET", "/v1/files/file-1/content"),
    ("POST", "/v1/batches"),
    ("GET", "/v1/batches/batch_1"),
    ("POST", "/v1/assistants"),
    ("POST", "/v1/threads/runs"),
    ("POST", "/v1/threads/thread_1/runs"),
    ("GET", "/v1/threads/thread_1/messages"),
    ("POST", "/v1/realtime/sessions"),
    ("POST", "/v1/realtime/calls"),
    ("POST", "/v1/videos"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/edits"),
    ("POST", "/v1/engines/davinci/completions"),
    ("POST", "/v1/completions/extra"),
    ("HEAD", "/v1/files/file-1/content"),
]


@pytest.mark.parametrize(("method", "path"), UNSCREENABLE)
def test_routes_that_generate_unscreened_are_404(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, method: str, path: str
) -> None:
    upstream.lenient = True
    proxy = make_proxy()
    with proxy.http() as http:
        reply = http.request(method, path, json={"model": "fake-model", "prompt": "hi", "input": "hi"})
    assert reply.status_code == 404
    if method != "HEAD":
        error = reply.json()["error"]
        assert error["code"] == "not_found" and "generate nothing" in error["message"]
    assert upstream.calls() == [] and guard.calls == []


@pytest.mark.parametrize(("method", "path"), [("PROPFIND", "/v1/models"), ("TRACE", "/v1/chat/completions"),
                                            ("MKCOL", "/healthz"), ("LOCK", "/console")])  # fmt: skip
def test_a_method_no_route_serves_is_a_json_405_before_the_upstream(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard, method: str, path: str
) -> None:
    with proxy.http() as http:
        reply = http.request(method, path, content=chat_body(f"{UNSAFE} now"))
        after = http.get("/v1/models")  # the connection is still good
    assert reply.status_code == 405
    error = reply.json()["error"]
    assert error["code"] == "method_not_allowed" and method in error["message"] and error["decision_id"]
    assert {"GET", "POST"} & set(reply.headers["allow"].split(", "))  # (Starlette's: the first route of the path)
    assert reply.headers["x-rsafe-decision-id"] == error["decision_id"]
    assert after.status_code == 200
    assert [(call.method, call.path) for call in upstream.calls()] == [("GET", "/v1/models")]
    assert guard.calls == []


ALLOWED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/fake-model", None),
    ("HEAD", "/v1/models", None),
    ("POST", "/v1/embeddings", {"model": "fake-embed", "input": "hello"}),
    ("POST", "/v1/moderations", {"input": "hello"}),
    ("POST", "/v1/responses/input_tokens", {"model": "fake-model", "input": "hello"}),
    ("DELETE", "/v1/responses/resp_fake", None),
    ("DELETE", "/v1/chat/completions/cmpl-fake", None),
    ("DELETE", "/v1/models/ft:fake", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ALLOWED)
def test_the_allow_listed_routes_pass_through_unscreened(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    guard: ScriptedGuard,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    upstream.lenient = True
    proxy = make_proxy()
    with proxy.http() as http:
        reply = http.request(method, path, json=body)
    assert reply.status_code in (200, 404)  # the upstream's own answer
    assert [(call.method, call.path) for call in upstream.calls()] == [(method, path)]
    assert guard.calls == []


def test_a_small_passed_through_answer_comes_whole_and_a_large_one_streams(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    with proxy.http() as http:
        small = http.post("/v1/embeddings", json={"model": "fake-embed", "input": "hello"})
        with http.stream("POST", "/v1/embeddings", json={"model": "fake-embed", "input": ["x"] * 2000}) as large:
            pieces = list(large.iter_raw())
            large_headers = large.headers
    assert small.status_code == 200 and small.json()["data"][0]["embedding"] == [0.1, 0.2]
    assert small.headers["content-length"] == str(len(small.content))  # read whole: sent in one piece
    assert "transfer-encoding" not in small.headers
    # over 64 KiB: relayed as it arrives, never held whole
    assert large_headers.get("transfer-encoding") == "chunked" and "content-length" not in large_headers
    assert len(json.loads(b"".join(pieces))["data"]) == 2000


def test_a_get_body_is_not_forwarded(proxy: Proxy, upstream: FakeUpstream) -> None:
    with proxy.http() as http:
        assert http.request("GET", "/v1/models", content=chat_body("hello")).status_code == 200
    assert upstream.calls("/v1/models")[0].body is None


def test_a_policy_extends_the_pass_through(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> None:
    upstream.lenient = True
    routes = [
        {"method": "GET", "path": "/v1/files"},
        {"method": "GET", "path": "/v1/files/{file_id}"},
        {"method": "POST", "path": "/v1/chat/{operation}"},  # cannot open a screened route spelled otherwise
    ]
    policy = write_policy(tmp_path, "files", passthrough=routes)
    proxy = make_proxy(
        tenants=[
            {"id": "files", "keys": [sha(KEY)], "policy": str(policy)},
            {"id": "default", "anonymous": True, "policy": "rsafe-default"},
        ]
    )
    keyed = {"authorization": f"Bearer {KEY}"}
    with proxy.http() as http:
        assert http.get("/v1/files", headers=keyed).status_code == 200
        assert http.get("/v1/files/file-1", headers=keyed).status_code == 200
        assert http.get("/v1/files/file-1/content", headers=keyed).status_code == 404
        assert http.post("/v1/files", headers=keyed).status_code == 404
        assert http.get("/v1/files").status_code == 404  # another tenant's policy: not listed
        for spelling in ("/v1/chat/Completions", "/v1/chat/completions.json", "/v1/chat/COMPLETIONS"):
            assert http.post(spelling, headers=keyed, content=chat_body(UNSAFE)).status_code == 404
        assert http.post("/v1/chat/other", headers=keyed, content=chat_body("hi")).status_code == 200
    assert [call.path for call in upstream.calls()] == ["/v1/files", "/v1/files/file-1", "/v1/chat/other"]
    assert guard.calls == []


@pytest.mark.parametrize(
    "route",
    [
        {"method": "GET", "path": "/files"},
        {"method": "GET", "path": "/v1/{anything}"},
        {"method": "GET", "path": "/v1/files/"},
        {"method": "GET", "path": "/v1//files"},
        {"method": "GET", "path": "/v1/files/../chat"},
        {"method": "GET", "path": "/v1/files/%2E%2E"},
        {"method": "GET", "path": "/v1/files/x{id}"},
        {"method": "GET", "path": "/v1/files;x"},
        {"method": "TRACE", "path": "/v1/files"},
        {"method": "get", "path": "/v1/files"},
        {"path": "/v1/files"},
    ],
)
def test_a_bad_passthrough_route_is_refused(route: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        Policy.model_validate({"id": "p", "categories": [{"id": "U1", "name": "x"}], "passthrough": [route]})


def test_the_passthrough_field_is_documented_in_the_schema() -> None:
    schema = Policy.model_json_schema()
    assert "unscreened" in schema["properties"]["passthrough"]["description"]
    assert "placeholder" in schema["$defs"]["PassthroughRoute"]["properties"]["path"]["description"]


def test_routing_override_headers_never_reach_the_upstream(proxy: Proxy, upstream: FakeUpstream) -> None:
    overrides = {
        "x-original-url": "/v1/chat/completions",
        "x-rewrite-url": "/v1/chat/completions",
        "x-http-method-override": "POST",
        "x-forwarded-prefix": "/v1/chat",
        "connection": "keep-alive, x-hop",
        "x-hop": "1",
    }
    with proxy.http() as http:
        assert http.get("/v1/models", headers=overrides).status_code == 200
    seen = upstream.calls("/v1/models")[0].headers
    assert not (set(overrides) - {"connection"}) & set(seen)
