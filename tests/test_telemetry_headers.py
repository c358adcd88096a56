"""Clean headers through the real proxy: the upstream's hop-by-hop and server-identity headers never reach the
client (one `date`, one `server`: the proxy's own), and request ids go both ways (the client's upstream; the
upstream's back, else the client's; none made up)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rsafe_proxy.config import Settings
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy, Servers, proxy_config, start_proxy

CHAT = "/v1/chat/completions"
HELLO = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
# what an upstream behind a CDN or a framework sends that names its servers or describes its hop
NOISE = [
    (b"server", b"fake-llm/1.0"),
    (b"x-powered-by", b"Express"),
    (b"via", b"1.1 edge.internal.example"),
    (b"alt-svc", b'h3=":443"; ma=86400'),
    (b"set-cookie", b"__cf_bm=secret; path=/; HttpOnly"),
    (b"connection", b"keep-alive, x-hop-only"),
    (b"keep-alive", b"timeout=5"),
    (b"x-hop-only", b"this hop"),
    (b"x-ratelimit-remaining-requests", b"99"),  # the upstream's own news for the client: kept
]
DROPPED = ("x-powered-by", "via", "alt-svc", "set-cookie", "keep-alive", "x-hop-only")


@dataclass
class Noisy:
    """An ASGI wrapper adding `extra` headers to every response of `app` (the FakeUpstream)."""

    app: ASGIApp
    extra: list[tuple[bytes, bytes]] = field(default_factory=lambda: list(NOISE))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def noisy_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.extra]}
            await send(message)

        await self.app(scope, receive, noisy_send)


@pytest.fixture
def double() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def noisy_proxy(servers: Servers, double: FakeUpstream, guard: ScriptedGuard, tmp_path: Path) -> Proxy:
    double.url = servers.start(Noisy(double.app), lifespan="off").url
    return start_proxy(servers, Settings.model_validate(proxy_config(double.url, guard.url, tmp_path)))


def _assert_clean(response: httpx.Response) -> None:
    assert response.headers.get_list("date") and len(response.headers.get_list("date")) == 1
    assert response.headers.get_list("server") == ["uvicorn"]  # the proxy's server, not the upstream's
    for name in DROPPED:
        assert name not in response.headers, name
    assert response.headers["x-rsafe-decision-id"]


def test_upstream_hop_and_identity_headers_are_dropped(noisy_proxy: Proxy) -> None:
    with noisy_proxy.http() as http:
        plain = http.post(CHAT, json=HELLO)
        with http.stream("POST", CHAT, json={**HELLO, "stream": True}) as streamed:
            streamed.read()
        passed = http.get("/v1/models")  # forwarded unscreened: the same rule
        errored = http.get("/v1/models/none")  # the upstream's 404, passed through
    for response in (plain, streamed, passed):
        assert response.status_code == 200
        _assert_clean(response)
        assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert errored.status_code == 404
    _assert_clean(errored)
    assert "Echo: hello" in plain.text


def test_a_blocked_request_carries_no_upstream_header(noisy_proxy: Proxy) -> None:
    with noisy_proxy.http() as http:
        blocked = http.post(CHAT, json={**HELLO, "messages": [{"role": "user", "content": f"{UNSAFE} now"}]})
    assert blocked.status_code == 400
    _assert_clean(blocked)
    assert "x-ratelimit-remaining-requests" not in blocked.headers  # the upstream's answer was discarded


def test_the_clients_request_id_goes_upstream_and_comes_back(proxy: Proxy, upstream: FakeUpstream) -> None:
    ids = {"x-request-id": "client-42"}
    with proxy.http() as http:
        with http.stream("POST", CHAT, json={**HELLO, "stream": True}, headers=ids) as streamed:
            streamed.read()  # the upstream's stream names no request id of its own
        blocked = http.post(CHAT, json={**HELLO, "messages": [{"role": "user", "content": UNSAFE}]}, headers=ids)
        missing = http.get("/v1/images/generations", headers=ids)  # the proxy's own 404
        passed = http.get("/v1/models", headers=ids)
    assert [call.headers.get("x-request-id") for call in upstream.calls(CHAT)] == ["client-42", "client-42"]
    assert upstream.calls("/v1/models")[0].headers.get("x-request-id") == "client-42"
    for response, status in ((streamed, 200), (blocked, 400), (missing, 404), (passed, 200)):
        assert response.status_code == status
        assert response.headers.get_list("x-request-id") == ["client-42"]


def test_the_upstreams_request_id_wins(proxy: Proxy) -> None:
    with proxy.http() as http:
        answered = http.post(CHAT, json=HELLO, headers={"x-request-id": "client-42"})
    assert answered.status_code == 200
    # the id the upstream's operator knows (the OpenAI SDK reports it as the request id), once
    assert answered.headers.get_list("x-request-id") == ["req-upstream"]


def test_no_request_id_is_made_up(proxy: Proxy, upstream: FakeUpstream) -> None:
    with proxy.http() as http:
        with http.stream("POST", CHAT, json={**HELLO, "stream": True}) as streamed:
            streamed.read()
        blocked = http.post(CHAT, json={**HELLO, "messages": [{"role": "user", "content": UNSAFE}]})
        odd = http.post(CHAT, json={**HELLO, "stream": True}, headers={"x-request-id": "x" * 500})
    assert "x-request-id" not in upstream.calls(CHAT)[0].headers
    for response in (streamed, blocked, odd):
        assert "x-request-id" not in response.headers  # the decision id names the request then
        assert len(response.headers["x-rsafe-decision-id"]) == 32
