"""Who gets into the console, over plain HTTP (httpx) against the proxy on loopback: off unless configured, its
paths canonicalised, sign-in and sessions (cookies, forged or expired ones, keys removed), CSRF tokens and origins
on every POST, failed sign-ins limited, security headers (what the pages show: test_console_http.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rsafe_proxy.console.keys import Viewer
from rsafe_proxy.console.limits import SIGN_IN_FAILURES, SIGN_IN_WINDOW_S, SignInLimit
from rsafe_proxy.console.session import SessionSigner
from tests.conftest import MakeProxy
from tests.console_site import (
    ADMIN_KEY,
    BANK_KEY,
    PROXY_KEYS,
    Site,
    csrf_of,
    signed_in,
    start_site,
)
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream

PAGES = ("/console/decisions", "/console/tenants", "/console/policies", "/console/playground")


@pytest.fixture
def site(make_proxy: MakeProxy, tmp_path: Path) -> Site:
    return start_site(make_proxy, tmp_path)


# -- off by default, and where its paths go ----------------------------------------------------------------------


def test_the_console_is_off_unless_configured(make_proxy: MakeProxy) -> None:
    proxy = make_proxy()
    with proxy.http() as http:
        answer = http.get("/console/login")
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == "Unknown path: /console/login"


def test_console_paths_are_canonicalised_like_every_path(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=10) as http:
        for spelling in ("/console//decisions/", "/console/x/../decisions", "/console/%64ecisions"):
            answer = http.get(spelling)
            assert (answer.status_code, answer.headers["location"]) == (303, "/console/login"), spelling
        refused = http.get("/console/%2e%2e/v1/models")
        assert refused.status_code == 400
        assert "encoded dot segment" in refused.json()["error"]["message"]
        unknown = http.get("/console/nothing-here")
        assert unknown.status_code == 404
        assert "The console has no such page." in unknown.text


def test_a_console_key_is_a_credential_never_forwarded_upstream(site: Site, upstream: FakeUpstream) -> None:
    with site.proxy.http() as http:
        answer = http.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {PROXY_KEYS['bank']}", "x-note": f"k={ADMIN_KEY}", "x-other": "kept"},
        )
    assert answer.status_code == 200
    sent = upstream.calls("/v1/chat/completions")[-1].headers
    assert "x-note" not in sent
    assert sent["x-other"] == "kept"


# -- sign-in and sessions ---------------------------------------------------------------------------------------


def test_every_page_needs_a_signed_in_session(site: Site, guard: ScriptedGuard) -> None:
    with httpx.Client(base_url=site.url, timeout=10) as http:
        for path in (*PAGES, "/console/decisions/0123abcd", "/console"):
            answer = http.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"] in ("/console/login", "/console/decisions")
        refused = http.post("/console/playground", data={"tenant": "bank", "side": "input", "text": UNSAFE})
    assert refused.status_code == 403
    assert guard.judged() == []


def test_sign_in_sets_a_strict_http_only_cookie_and_never_echoes_the_key(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=10) as http:
        form = http.get("/console/login")
        assert 'type="password"' in form.text
        assert '<label for="console_key">' in form.text
        wrong = http.post("/console/login", data={"csrf": csrf_of(form.text), "console_key": "guess-" + ADMIN_KEY})
        assert wrong.status_code == 401
        assert "That is not a console key." in wrong.text
        assert ADMIN_KEY not in wrong.text
        # proxy keys are not console keys
        proxy_key = http.post("/console/login", data={"csrf": csrf_of(form.text), "console_key": PROXY_KEYS["bank"]})
        assert proxy_key.status_code == 401
        right = http.post("/console/login", data={"csrf": csrf_of(form.text), "console_key": ADMIN_KEY})
        assert right.status_code == 303
        assert right.headers["location"] == "/console/decisions"
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Path=/console" in cookie
        assert ADMIN_KEY not in cookie
        # a new session at sign-in: the sign-in form's token is no longer this session's
        assert csrf_of(http.get("/console/playground").text) != csrf_of(form.text)
        for path in PAGES:
            page = http.get(path)
            assert page.status_code == 200, path
            assert all(secret not in page.text for secret in (ADMIN_KEY, BANK_KEY, *PROXY_KEYS.values()))
        signed_out = http.post("/console/logout", data={"csrf": csrf_of(page.text)})
        assert (signed_out.status_code, signed_out.headers["location"]) == (303, "/console/login")
        assert http.get("/console/decisions").status_code == 303


def test_a_forged_or_expired_cookie_is_no_session() -> None:
    signer = SessionSigner(b"s" * 32, ttl_s=60)
    session = signer.signed_in(Viewer("bank"), b"d" * 32, now=1000.0)
    cookie = signer.cookie(session)
    assert signer.read(cookie, now=1001.0) == session
    assert signer.read(cookie, now=1061.0) is None  # expired
    payload, mac = cookie.split(".")
    admin = signer.cookie(signer.signed_in(Viewer(None), b"d" * 32, now=1000.0)).split(".")[0]
    assert signer.read(f"{admin}.{mac}", now=1001.0) is None  # another payload under this signature
    assert signer.read(f"{payload}.{mac[:-2]}AA", now=1001.0) is None
    assert SessionSigner(b"t" * 32, ttl_s=60).read(cookie, now=1001.0) is None  # another secret
    assert signer.read("not-a-cookie", now=1001.0) is None
    assert signer.still_keyed(session, [b"d" * 32])
    assert not signer.still_keyed(session, [b"e" * 32])


def test_removing_a_key_signs_its_holders_out(
    make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RSAFE_TEST_CONSOLE_KEY", "rotating-console-key-0123")
    site = start_site(make_proxy, tmp_path, console={"admin_key": "env:RSAFE_TEST_CONSOLE_KEY"})
    with signed_in(site, "rotating-console-key-0123") as http:
        assert http.get("/console/tenants").status_code == 200
        monkeypatch.setenv("RSAFE_TEST_CONSOLE_KEY", "rotated-console-key-4567")
        answer = http.get("/console/tenants")
        form = http.get("/console/login")  # no loop back to the pages: the form, signed out
    assert (answer.status_code, answer.headers["location"]) == (303, "/console/login")
    assert form.status_code == 200
    assert 'name="console_key"' in form.text and "Sign out" not in form.text


# -- CSRF and headers -------------------------------------------------------------------------------------------


def test_every_post_needs_this_sessions_token_and_this_origin(site: Site, guard: ScriptedGuard) -> None:
    form = {"tenant": "bank", "side": "input", "text": f"try {UNSAFE}"}
    with signed_in(site, ADMIN_KEY) as http, signed_in(site, ADMIN_KEY) as other:
        token, foreign = csrf_of(http.get("/console/playground").text), csrf_of(other.get("/console/playground").text)
        refusals = [
            http.post("/console/playground", data=form),
            http.post("/console/playground", data={**form, "csrf": foreign}),
            http.post("/console/playground", data={**form, "csrf": token}, headers={"origin": "https://evil.example"}),
            http.post("/console/playground", data={**form, "csrf": token}, headers={"sec-fetch-site": "cross-site"}),
            http.post("/console/playground", content=f'{{"csrf": "{token}"}}', headers={"content-type": "text/plain"}),
            http.post("/console/logout", data={"csrf": foreign}),
        ]
        assert [answer.status_code for answer in refusals] == [403, 403, 403, 403, 415, 403]
        assert guard.judged() == []
        assert http.get("/console/tenants").status_code == 200  # the refused logout signed no one out
        accepted = http.post(
            "/console/playground",
            data={**form, "csrf": token},
            headers={"origin": site.url, "sec-fetch-site": "same-origin"},
        )
        # behind a TLS reverse proxy that rewrites Host, the origin is not the one the proxy sees: the browser's
        # own Sec-Fetch-Site says where the form came from
        behind = http.post(
            "/console/playground",
            data={**form, "csrf": token},
            headers={"origin": "https://console.example", "sec-fetch-site": "same-origin"},
        )
    assert (accepted.status_code, behind.status_code) == (200, 200)
    assert 'data-testid="verdict"><span class="pill unsafe">' in behind.text
    assert guard.judged("input") == [guard.judged("input")[0]] * 2  # the two accepted, each judged
    assert f"try {UNSAFE}" in guard.judged("input")[0]


def test_sign_in_itself_needs_the_forms_token(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=10) as http:
        http.get("/console/login")
        answer = http.post("/console/login", data={"console_key": ADMIN_KEY})
        assert answer.status_code == 403
        assert http.get("/console/decisions").status_code == 303  # still signed out
    with httpx.Client(base_url=site.url, timeout=10) as cookieless:
        assert cookieless.post("/console/login", data={"console_key": ADMIN_KEY, "csrf": "x"}).status_code == 403


def test_failed_sign_ins_are_limited_per_client_address(site: Site) -> None:
    def attempt(http: httpx.Client, key: str, **headers: str) -> httpx.Response:
        token = csrf_of(http.get("/console/login", headers=headers).text)
        return http.post("/console/login", data={"csrf": token, "console_key": key}, headers=headers)

    with httpx.Client(base_url=site.url, timeout=10) as http:
        failures = [attempt(http, f"guess-{number}") for number in range(SIGN_IN_FAILURES)]
        assert [answer.status_code for answer in failures] == [401] * SIGN_IN_FAILURES
        # the limit reached, every attempt from this address is refused, the right key's too (else a refusal
        # would tell a guess that is right from one that is not)
        limited = attempt(http, ADMIN_KEY)
        assert limited.status_code == 429
        assert 0 < int(limited.headers["retry-after"]) <= SIGN_IN_WINDOW_S
        assert "Too many failed sign-ins from your address" in limited.text
        assert ADMIN_KEY not in limited.text and "set-cookie" in limited.headers  # a page with a fresh form
        assert http.get("/console/decisions").status_code == 303  # not signed in
    # another address (as a reverse proxy on loopback, which uvicorn trusts, forwards it) signs in as ever
    with httpx.Client(base_url=site.url, timeout=10) as other:
        assert attempt(other, ADMIN_KEY, **{"x-forwarded-for": "203.0.113.7"}).status_code == 303
        assert other.get("/console/tenants").status_code == 200


def test_the_sign_in_limit_forgets_old_failures_and_tracks_a_bounded_number_of_addresses() -> None:
    now = [1000.0]
    limit = SignInLimit(failures=2, window_s=60.0, addresses=3, clock=lambda: now[0])
    for _ in range(2):
        assert limit.retry_after("a") is None
        limit.failed("a")
    assert limit.retry_after("a") == 60.0
    assert limit.retry_after("b") is None  # another address is not limited
    now[0] += 45.0
    assert limit.retry_after("a") == 15.0
    now[0] += 15.0
    assert limit.retry_after("a") is None  # the window is over: its failures are forgotten
    limit.failed("a")
    assert limit.retry_after("a") is None  # one failure in the new window
    for address in ("b", "c", "d", "e"):
        limit.failed(address)
        limit.failed(address)
    assert len(limit) == 3  # the oldest addresses go first
    assert limit.retry_after("e") == 60.0 and limit.retry_after("a") is None
    now[0] += 61.0
    limit.failed("f")
    assert len(limit) == 1  # expired entries are dropped as new ones come


def test_pages_carry_security_headers_and_no_script(site: Site) -> None:
    with signed_in(site, ADMIN_KEY) as http:
        for path in (*PAGES, "/console/login", "/console/nothing"):
            page = http.get(path)
            policy = page.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy, path
            assert "script-src" not in policy and "unsafe-inline" not in policy
            assert page.headers["x-frame-options"] == "DENY"
            assert page.headers["cache-control"] == "no-store"
            assert page.headers["x-content-type-options"] == "nosniff"
            assert "<script" not in page.text.lower()
        stylesheet = http.get("/console/static/console.css")
    assert stylesheet.status_code == 200
    assert stylesheet.headers["content-type"].startswith("text/css")
