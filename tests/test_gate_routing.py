"""The gate's routing, credentials and admin endpoints (issue 9), tried as an attacker would.

Every spelling of a path either reaches a screened route (the guard judges it, an unsafe prompt is blocked), or is
refused with 4xx before the upstream or the guard sees anything. A proxy key sent any way never reaches the
upstream or the log. /metrics and /readyz can require an admin key. Which routes are served (stored content
screened, generating routes 404, the pass-through allow-list): test_gate_routes.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any

import httpx
import pydantic
import pytest

from rsafe_proxy import routes
from rsafe_proxy.errors import InvalidRequest
from rsafe_proxy.paths import canonical_path, pattern_matches, pattern_regex, without_credentials
from rsafe_proxy.policy.tenants import KeyRing, bearer_token
from tests.conftest import MakeProxy
from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE, UNSAFE_ANSWER, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.sdk import user
from tests.serving import Proxy

KEY = "sk-proxy-team-a-0123456789"
ADMIN = "sk-admin-9876543210"


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class RawReply:
    status: int
    head: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunked(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        length = int(size.split(b";")[0], 16)
        if length == 0:
            break
        out, body = out + rest[:length], rest[length + 2 :]
    return out


def raw_request(
    url: str, method: str, target: str | bytes, body: bytes = b"", headers: dict[str, str] | None = None
) -> RawReply:
    """One request sent byte for byte on a socket: no client library normalises the target first."""
    host, port = url.removeprefix("http://").split(":")
    wanted = target if isinstance(target, bytes) else target.encode("latin-1")
    lines = [f"Host: {host}:{port}", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {"Content-Type": "application/json"}).items()]
    request = method.encode() + b" " + wanted + b" HTTP/1.1\r\n" + "\r\n".join(lines).encode() + b"\r\n\r\n" + body
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    if "transfer-encoding: chunked" in text.lower():
        payload = _dechunked(payload)
    return RawReply(int(text.split(" ")[1]), text, payload)


def chat_body(text: str, stream: bool = False) -> bytes:
    return json.dumps(
        {"model": "fake-model", "messages": [{"role": "user", "content": text}], "stream": stream}
    ).encode()


# -- the attack table: every spelling of the chat completions path ------------------------------------------------

SCREENED, REFUSED, NOT_FOUND, REJECTED = "screened", "refused", "not found", "rejected"

SPELLINGS: list[tuple[str, str | bytes, str]] = [
    ("POST", "/v1/chat/completions", SCREENED),
    ("POST", "/v1/x/../chat/completions", SCREENED),  # the bypass issue 9 saw: httpx resolved it on the way out
    ("POST", "/v1/models/../chat/completions", SCREENED),
    ("POST", "/v1/embeddings/../chat/completions", SCREENED),
    ("POST", "/v1/./chat/./completions", SCREENED),
    ("POST", "//v1//chat///completions", SCREENED),
    ("POST", "/v1/chat/completions/", SCREENED),
    ("POST", "/v1/chat/completions/.", SCREENED),
    ("POST", "/v1/chat/completions/x/..", SCREENED),
    ("POST", "/v1/chat/%63ompletions", SCREENED),  # an encoded unreserved character is decoded
    ("POST", "/v1/chat/completions?", SCREENED),
    ("POST", "/v1/chat/completions?stream=false&x=%2F..", SCREENED),
    ("POST", "/v1/x/%2e%2e/chat/completions", REFUSED),  # encoded dot segments
    ("POST", "/v1/x/.%2E/chat/completions", REFUSED),
    ("POST", "/v1/x/%2E/chat/completions", REFUSED),
    ("POST", "/v1/chat%2Fcompletions", REFUSED),  # encoded slash
    ("POST", "/v1/chat%2fcompletions", REFUSED),
    ("POST", "/v1/chat%5Ccompletions", REFUSED),  # encoded backslash
    ("POST", "/v1\\chat\\completions", REFUSED),
    ("POST", "/v1/chat/completions;x=1", REFUSED),  # path parameters
    ("POST", "/v1/chat;/completions", REFUSED),
    ("POST", "/v1/chat/completions%3B", REFUSED),
    ("POST", "/v1/chat/completions%00", REFUSED),  # NUL and controls
    ("POST", "/v1/chat/completions%09", REFUSED),
    ("POST", "/v1/chat/completions%0D%0A", REFUSED),
    ("POST", "/v1/chat/completions%20", REFUSED),
    ("POST", "/v1/chat/completions%FF", REFUSED),  # not UTF-8
    ("POST", "/v1/chat/completions%C0%AF", REFUSED),  # overlong '/'
    ("POST", "/v1/chat/completions%", REFUSED),  # malformed escapes
    ("POST", "/v1/chat/completions%ZZ", REFUSED),
    ("POST", "/v1/chat/completions%252F", REFUSED),  # double encoding
    ("POST", "/v1/chat%252e%252e/completions", REFUSED),
    ("POST", "/v1/models%3F/x", REFUSED),  # an encoded '?' or '#' would split the path again
    ("POST", "/v1/chat/completions%23", REFUSED),
    ("POST", "/v1/chat/completions#frag", REFUSED),  # a fragment is no part of a request target
    ("POST", "/v1/chat/%EF%BC%8Fcompletions", REFUSED),  # fullwidth solidus
    ("POST", "/v1/chat/completions%E2%80%8B", REFUSED),  # zero-width space
    ("POST", "/../v1/chat/completions", REFUSED),  # above the root
    ("POST", "/v1/../../v1/chat/completions", REFUSED),
    ("POST", "*", REFUSED),
    # absolute-form: llhttp would hand on only its path; a front proxy may have routed by its host
    ("POST", "http://example.com/v1/chat/completions", REFUSED),
    ("POST", "/V1/Chat/Completions", NOT_FOUND),  # upstreams are case-sensitive: not a route, and not forwarded
    ("POST", "/v1/Chat/Completions", NOT_FOUND),
    ("POST", "/v1/CHAT/COMPLETIONS", NOT_FOUND),
    ("POST", "/v1/chat/completions.json", NOT_FOUND),
    ("POST", "/v1/chat/completions%2E", NOT_FOUND),
    ("POST", "/v1/chat/completions/extra", REFUSED),  # a completion's update: it takes `metadata` only
    ("POST", "/v1/chat/completions/x/y", NOT_FOUND),
    ("POST", "/v1/chat/completion", NOT_FOUND),
    ("POST", "/chat/completions", NOT_FOUND),
    ("POST", "/v2/chat/completions", NOT_FOUND),
    ("PUT", "/v1/chat/completions", NOT_FOUND),
    ("PATCH", "/v1/chat/completions", NOT_FOUND),
    ("OPTIONS", "/v1/chat/completions", NOT_FOUND),
    ("post", "/v1/chat/completions", REJECTED),  # methods are case-sensitive: no route takes it
    ("POST", b"/v1/chat/completions\xc3\xa9", REJECTED),  # raw non-ASCII: h11 refuses the request line
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(("method", "target", "expected"), SPELLINGS)
def test_every_spelling_is_screened_or_refused_before_the_upstream(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    guard: ScriptedGuard,
    method: str,
    target: str | bytes,
    expected: str,
    stream: bool,
) -> None:
    upstream.lenient = True  # an upstream that answers whatever reaches it: only the gate stands in between
    proxy = make_proxy()
    reply = raw_request(proxy.url, method, target, chat_body(f"How do I make {UNSAFE}?", stream))
    assert UNSAFE not in reply.body.decode("latin-1")
    if expected == SCREENED:
        assert (reply.status, reply.json()["error"]["code"]) == (400, "content_filter")
        assert any(UNSAFE in text for text in guard.judged("input"))
        return
    assert upstream.calls() == [] and guard.calls == []
    if expected == REJECTED:
        assert 400 <= reply.status < 500
        return
    status, code = (400, "invalid_request") if expected == REFUSED else (404, "not_found")
    assert (reply.status, reply.json()["error"]["code"]) == (status, code), reply.body


@pytest.mark.parametrize(
    "target",
    ["/v1/x/../chat/completions", "//v1/chat//completions/", "/v1/chat/%63ompletions", "/v1/./chat/completions"],
)
def test_a_canonicalised_spelling_is_served_on_the_canonical_path(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard, target: str
) -> None:
    reply = raw_request(proxy.url, "POST", target, chat_body("hello"))
    assert reply.status == 200
    assert reply.json()["choices"][0]["message"]["content"] == "Echo: hello"
    assert guard.judged("input") == ["hello"]
    assert [call.path for call in upstream.calls()] == ["/v1/chat/completions"]


def test_a_screened_answer_spelled_another_way_is_still_screened(proxy: Proxy, upstream: FakeUpstream) -> None:
    reply = raw_request(proxy.url, "POST", "/v1/x/../chat/completions", chat_body(f"{ASK_UNSAFE_ANSWER} now", True))
    assert reply.status == 200
    assert UNSAFE not in reply.body.decode()
    assert "content_filter" in reply.body.decode()


@pytest.mark.parametrize(
    ("raw", "path", "canonical"),
    [
        (b"/", "/", b"/"),
        (b"/v1/models/", "/v1/models", b"/v1/models"),
        (b"/v1/a/b/../../models", "/v1/models", b"/v1/models"),
        (b"/v1/%6D%6f%64els", "/v1/models", b"/v1/models"),
        (b"/v1/models/ft:gpt-4o:org:x", "/v1/models/ft:gpt-4o:org:x", b"/v1/models/ft:gpt-4o:org:x"),
        (b"/v1/models/caf%C3%A9", "/v1/models/caf\u00e9", b"/v1/models/caf%C3%A9"),
        (b"/v1/models/caf%c3%a9", "/v1/models/caf\u00e9", b"/v1/models/caf%C3%A9"),
        (b"/v1/models/%3A%40", "/v1/models/:@", b"/v1/models/:@"),
        (b"/v1/models/a..b/...", "/v1/models/a..b/...", b"/v1/models/a..b/..."),
    ],
)
def test_canonical_paths(raw: bytes, path: str, canonical: bytes) -> None:
    assert canonical_path(raw) == (path, canonical)
    assert canonical_path(canonical) == (path, canonical)  # canonical is a fixed point


def test_the_compiled_route_tables_match_exactly_what_the_patterns_do() -> None:
    """passes_through reads SCREENED and PASSTHROUGH as one regex per method: it must match the paths the
    segment-by-segment reading does, and no other (placeholders one whole non-empty segment, dots literal)."""
    patterns = [pattern for _, pattern in (*routes.SCREENED, *routes.PASSTHROUGH)]
    segments = ["v1", "chat", "completions", "responses", "models", "cancel", "input_tokens", "x", "a.b", "{id}"]
    paths = {f"/{a}/{b}" for a in segments for b in segments} | {
        f"/{a}/{b}/{c}" for a in segments[:2] for b in segments for c in segments
    }
    paths |= {f"/v1/{b}/{c}/{d}" for b in segments for c in segments for d in ("cancel", "x", "")}
    paths |= {"/v1/models/", "/v1//completions", "/v1/chat/completionsX", "/v1/chat.completions", "/v1/models/a/b"}
    for pattern in patterns:
        compiled = pattern_regex([pattern])
        for path in paths | {pattern}:
            assert (compiled.fullmatch(path) is not None) == pattern_matches(pattern, path), (pattern, path)
    together = pattern_regex(patterns)
    for path in paths:
        assert (together.fullmatch(path) is not None) == any(pattern_matches(p, path) for p in patterns), path
    assert pattern_regex([]).fullmatch("") is None


@pytest.mark.parametrize(
    "raw",
    [b"", b"v1/models", b"/v1/%2e%2e", b"/v1/%2E", b"/..", b"/v1/a%2Fb", b"/v1/a;b", b"/v1/a\\b", b"/v1/\xc3\xa9",
     b"/v1/a%25", b"/v1/%C3%28", b"/v1/%EF%BC%8E%EF%BC%8E", b"/v1/e%CC%81", b"/v1/%7F", b"/v1/a b"],
)  # fmt: skip
def test_paths_with_no_safe_reading_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        canonical_path(raw)


def test_the_upstream_gets_the_canonical_path_as_sent(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.lenient = True
    proxy = make_proxy(tenants=[{"id": "default", "anonymous": True, "policy": "rsafe-default"}])
    for target in ("/v1/models/ft:gpt-4o:org:x", "/v1/models/caf%C3%A9", "/v1/x/../models/m%2D1"):
        assert raw_request(proxy.url, "GET", target).status == 200
    assert [call.path for call in upstream.calls()] == [
        "/v1/models/ft:gpt-4o:org:x",
        "/v1/models/caf\u00e9",
        "/v1/models/m-1",
    ]


# -- credentials: a proxy key never goes upstream, never into a log ----------------------------------------------


@pytest.fixture
def keyed(make_proxy: MakeProxy) -> Proxy:
    """One keyed tenant beside the anonymous drop-in one (whose clients' own credentials do go upstream)."""
    return make_proxy(
        tenants=[
            {"id": "team-a", "keys": [sha(KEY)], "policy": "rsafe-default"},
            {"id": "default", "anonymous": True, "policy": "rsafe-default"},
        ],
        server={"admin_keys": [sha(ADMIN)]},
    )


def _leaks(upstream: FakeUpstream, *secrets: str) -> list[str]:
    found = []
    for call in upstream.calls():
        seen = json.dumps([call.path, call.query, dict(call.headers)]).lower()
        found += [f"{call.method} {call.path}: {secret}" for secret in secrets if secret.lower() in seen]
    return found


KEY_CARRIERS: list[dict[str, Any]] = [
    {"extra_headers": {"x-api-key": KEY}},
    {"extra_headers": {"api-key": KEY}},
    {"extra_headers": {"openai-organization": KEY, "openai-project": KEY}},
    {"extra_headers": {"proxy-authorization": f"Bearer {KEY}", "cookie": f"session={KEY}"}},
    {"extra_headers": {"x-custom-auth": f"Token {KEY}", "x-forwarded-authorization": f"Bearer {KEY}"}},
    {"extra_headers": {"x-settings": f'a=1; key="{KEY}"', "x-list": f"one,{KEY}"}},
    {"extra_headers": {"x-api-key": ADMIN, "x-admin": f"Bearer {ADMIN}"}},
    {"extra_query": {"api_key": KEY}},
    {"extra_query": {"key": KEY, "api-key": KEY, "access_token": KEY}},
    {"extra_query": {"anything": KEY}},
    {"extra_query": {"anything": ADMIN}},
]


@pytest.mark.parametrize("carrier", KEY_CARRIERS)
def test_a_proxy_key_sent_any_way_never_reaches_the_upstream(
    keyed: Proxy, upstream: FakeUpstream, carrier: dict[str, Any]
) -> None:
    with keyed.client(KEY) as client:
        answer = client.chat.completions.create(model="fake-model", messages=user("hello"), **carrier)
        client.models.list(**carrier)
        client.embeddings.create(model="fake-embed", input="hello", **carrier)
        made = client.responses.create(model="fake-model", input="hello", **carrier)
        client.responses.retrieve(made.id, **carrier)
        client.responses.delete(made.id, **carrier)
    assert answer.choices[0].message.content == "Echo: hello"
    assert len(upstream.calls()) == 6
    assert _leaks(upstream, KEY, ADMIN) == []


@pytest.mark.parametrize("carrier", KEY_CARRIERS)
def test_a_drop_in_client_never_forwards_a_proxy_key(
    keyed: Proxy, upstream: FakeUpstream, carrier: dict[str, Any]
) -> None:
    """No Authorization: the anonymous drop-in tenant, whose other headers go upstream, but no proxy key."""
    with keyed.http() as http:
        reply = http.post(
            "/v1/chat/completions",
            content=chat_body("hello"),
            headers={"content-type": "application/json", **carrier.get("extra_headers", {})},
            params=carrier.get("extra_query"),
        )
    assert (reply.status_code, reply.headers["x-rsafe-tenant"]) == (200, "default")
    assert len(upstream.calls()) == 1
    assert _leaks(upstream, KEY, ADMIN) == []


@pytest.mark.parametrize(
    "authorization", [f"bearer {KEY}", f"BEARER {KEY}", f"Bearer\t{KEY}", f"Bearer   {KEY}  ", f" Bearer {KEY}"]
)
def test_every_bearer_spelling_resolves_the_tenant_and_is_not_forwarded(
    keyed: Proxy, upstream: FakeUpstream, authorization: str
) -> None:
    reply = raw_request(
        keyed.url,
        "POST",
        "/v1/chat/completions",
        chat_body("hello"),
        {"Content-Type": "application/json", "Authorization": authorization},
    )
    assert reply.status == 200
    assert "x-rsafe-tenant: team-a" in reply.head.lower()
    assert _leaks(upstream, KEY) == []


def test_a_key_in_another_authorization_scheme_is_not_forwarded(keyed: Proxy, upstream: FakeUpstream) -> None:
    with keyed.http() as http:
        reply = http.post("/v1/chat/completions", content=chat_body("hello"), headers={"authorization": f"Token {KEY}"})
    assert reply.status_code == 200 and reply.headers["x-rsafe-tenant"] == "default"
    assert "authorization" not in upstream.calls()[0].headers
    assert _leaks(upstream, KEY) == []


@pytest.mark.parametrize("name", ["authorization", "Authorization"])
def test_a_duplicated_authorization_header_is_refused(
    keyed: Proxy, upstream: FakeUpstream, guard: ScriptedGuard, name: str
) -> None:
    with keyed.http() as http:
        reply = http.post(
            "/v1/chat/completions",
            content=chat_body("hello"),
            headers=[(name, f"Bearer {KEY}"), ("authorization", "Bearer sk-other")],
        )
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "invalid_request")
    assert upstream.calls() == [] and guard.calls == []


def test_keys_are_never_logged(keyed: Proxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="uvicorn.access")
    caplog.set_level(logging.DEBUG, logger="httpx")
    caplog.set_level(logging.DEBUG, logger="rsafe_proxy")
    with keyed.client(KEY) as client:
        query = {"api_key": KEY, "other": ADMIN, "keep": "yes"}
        client.chat.completions.create(model="fake-model", messages=user("hello"), extra_query=query)
        client.models.list(extra_query={"key": KEY})
    with keyed.http() as http:
        assert http.get("/v1/files/file-1/content", params={"api_key": KEY}).status_code == 404
        http.get("/metrics", params={"api_key": ADMIN}, headers={"authorization": f"Bearer {ADMIN}"})
        http.get("/v1/x/%2e%2e/models", params={"x": KEY})  # refused before routing: still not logged
    # the test's own client logs through httpx too: only the proxy's records count (its upstream calls)
    logged = "\n".join(
        record.getMessage()
        for record in caplog.records
        if not (record.name == "httpx" and keyed.url in record.getMessage())
    )
    assert "/v1/chat/completions?keep=yes" in logged  # the access log did record the requests
    assert KEY not in logged and ADMIN not in logged
    assert _leaks(upstream, KEY, ADMIN) == []
    assert upstream.calls("/v1/chat/completions")[0].query == "keep=yes"


def test_credentials_are_removed_from_a_query() -> None:
    def secret(value: str) -> bool:
        return value == KEY

    assert without_credentials(b"a=1&api_key=x&b=2", secret) == b"a=1&b=2"
    assert without_credentials(b"API%5FKEY=x&Key=y&token=z", secret) == b""
    assert without_credentials(f"a=1&z={KEY}".encode(), secret) == b"a=1"
    assert without_credentials(b"a=1;api_key=x&b=2", secret) == b"b=2"
    assert without_credentials(b"a=1&b=2", secret) == b"a=1&b=2"


# -- admin endpoints -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["sha256", "env"])
def test_admin_endpoints_need_the_admin_key_when_one_is_set(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    monkeypatch.setenv("RSAFE_TEST_ADMIN_KEY", ADMIN)
    key = sha(ADMIN) if form == "sha256" else "env:RSAFE_TEST_ADMIN_KEY"
    proxy = make_proxy(
        server={"admin_keys": [key]},
        tenants=[{"id": "team-a", "keys": [sha(KEY)], "policy": "rsafe-default"}],
    )
    with proxy.http() as http:
        assert http.get("/healthz").status_code == 200
        for path in ("/metrics", "/readyz"):
            for headers in ({}, {"authorization": f"Bearer {KEY}"}, {"authorization": "Bearer sk-wrong"}):
                refused = http.get(path, headers=headers)
                assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
            assert http.get(path, headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
        assert "rsafe_" in http.get("/metrics", headers={"authorization": f"bearer {ADMIN}"}).text


def test_an_admin_key_from_an_unset_variable_closes_the_endpoints(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(server={"admin_keys": ["env:RSAFE_TEST_ADMIN_KEY_NEVER_SET"]})
    with proxy.http() as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"authorization": "Bearer"}).status_code == 401
        assert http.get("/healthz").status_code == 200


def test_admin_endpoints_are_open_by_default(proxy: Proxy) -> None:
    with proxy.http() as http:
        assert http.get("/metrics").status_code == 200
        assert http.get("/readyz").status_code == 200


def test_admin_keys_take_the_tenant_key_forms(make_proxy: MakeProxy) -> None:
    with pytest.raises(pydantic.ValidationError, match="never the key itself"):
        make_proxy(server={"admin_keys": [ADMIN]})


def test_a_lenient_upstream_really_answers_unknown_paths(upstream: FakeUpstream) -> None:
    """The attack table's premise: without the gate, the lenient double would have answered unsafely."""
    upstream.lenient = True
    reply = httpx.post(f"{upstream.url}/v1/Chat/Completions", json={})
    assert reply.json()["choices"][0]["message"]["content"] == UNSAFE_ANSWER


def test_a_refused_path_leaves_the_connection_usable(proxy: Proxy, guard: ScriptedGuard) -> None:
    with proxy.http() as http:
        refused = http.post("/v1/x/%2e%2e/chat/completions", content=chat_body("hello" * 2000))
        served = http.post("/v1/chat/completions", content=chat_body("hello"))
    assert (refused.status_code, served.status_code) == (400, 200)
    assert guard.judged("input") == ["hello"]


def test_key_rings_find_a_key_in_any_word() -> None:
    ring = KeyRing([hashlib.sha256(KEY.encode()).digest()])
    for value in (KEY, f"Bearer {KEY}", f"Token  {KEY} ", f"a, {KEY}", f'key="{KEY}"', f"k={KEY}&x=1"):
        assert ring.carried_by(value), value
    for value in ("", "Bearer", KEY[:-1], KEY.upper(), f"{KEY}x"):
        assert not ring.carried_by(value), value
    assert not KeyRing([]).carried_by(KEY)
    assert [bearer_token(v) for v in (f"bearer {KEY}", f"Bearer\t{KEY}", "Basic x", "Bearer", None)] == [
        KEY,
        KEY,
        None,
        None,
        None,
    ]
