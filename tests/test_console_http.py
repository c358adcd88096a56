"""What the console shows, over plain HTTP (httpx) against the proxy on loopback: escaping, filters and paging,
decisions with their policy text, policy versions, tenant isolation, the playground, reload errors and its
settings (sign-in, sessions, CSRF and headers: test_console_access.py). Decisions come from real traffic through
the proxy, or are written to the real SQLite audit log where a test needs many or old ones."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from rsafe_proxy.audit.record import DecisionQuery, DecisionRecord, PolicyVersion
from rsafe_proxy.config import load_settings
from rsafe_proxy.console.diff import side_by_side
from rsafe_proxy.console.filters import PAGE_SIZE, parse_time, read_filters
from rsafe_proxy.yamlsource import FileInvalid
from tests.conftest import MakeProxy
from tests.console_site import (
    ADMIN_KEY,
    BANK_KEY,
    HOSTILE,
    Site,
    csrf_of,
    sha,
    signed_in,
    start_site,
    traffic,
)
from tests.doubles import UNSAFE, ScriptedGuard


@pytest.fixture
def site(make_proxy: MakeProxy, tmp_path: Path) -> Site:
    return start_site(make_proxy, tmp_path)


def decision_ids(page: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r'href="/console/decisions/([0-9a-f]+)"', page)))


def record(decision_id: str, **fields: object) -> DecisionRecord:
    values: dict[str, object] = {
        "decision_id": decision_id,
        "seq": 0,
        "time": time.time(),
        "tenant": "bank",
        "route": "/v1/chat/completions",
        "side": "input",
        "verdict": "safe",
        "score": None,
        "categories": (),
        "action": "allow",
        "policy_id": "bank-policy",
        "policy_version": "0123456789abcdef",
        "engine": "openai",
        "latency_ms": 3.0,
        "cache_hit": False,
    }
    return DecisionRecord(**{**values, **fields})  # type: ignore[arg-type]


# -- what the pages show ----------------------------------------------------------------------------------------


def test_a_hostile_prompt_renders_as_text_everywhere(site: Site) -> None:
    traffic(site)
    with signed_in(site, ADMIN_KEY) as http:
        listing = http.get("/console/decisions", params={"tenant": "bank"})
        pages = [http.get(f"/console/decisions/{decision_id}").text for decision_id in decision_ids(listing.text)]
        hostile = [page for page in pages if "pwned" in page]
        assert hostile, "the guard's reasoning quotes the prompt: one decision page shows it"
        playground = http.post(
            "/console/playground",
            data={"csrf": csrf_of(listing.text), "tenant": "bank", "side": "input", "text": HOSTILE},
        ).text
    for page in (*hostile, playground):
        assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in page
        assert "<script" not in page and "<img" not in page and "<b>bold" not in page


def test_the_decisions_list_filters_and_pages(site: Site) -> None:
    traffic(site)
    with signed_in(site, ADMIN_KEY) as http:
        everything = http.get("/console/decisions")
        assert "8 decisions match" in everything.text
        unsafe = http.get("/console/decisions", params={"verdict": "unsafe"})
        assert "2 decisions match" in unsafe.text
        assert unsafe.text.count('class="pill block"') == 2
        bank_blocks = http.get("/console/decisions", params={"tenant": "bank", "action": "block", "side": "input"})
        assert "1 decision matches" in bank_blocks.text
        category = http.get("/console/decisions", params={"category": "U2", "tenant": "shop"})
        assert "1 decision matches" in category.text
        future = http.get("/console/decisions", params={"since": "2999-01-01"})
        assert "0 decisions match" in future.text
        wrong = http.get("/console/decisions", params={"verdict": "evil", "since": "yesterday", "page": "0"})
        assert wrong.status_code == 400
        for why in ("one of safe, unsafe, unknown", "a date like 2025-06-30", "a whole number from 1"):
            assert why in wrong.text
        tenants = http.get("/console/tenants").text  # the bank policy's version, as the tenants page shows it
        bank_version = re.search(r"<td>bank</td><td>bank-policy</td><td><code>([0-9a-f]+)</code>", tenants)
        assert bank_version
        by_version = http.get("/console/decisions", params={"policy_version": bank_version.group(1)})
        assert "5 decisions match" in by_version.text

    store = site.store()
    try:
        store.write([record(f"{n:032x}", time=1_700_000_000.0 + n) for n in range(PAGE_SIZE + 5)])
    finally:
        store.close()
    with signed_in(site, ADMIN_KEY) as http:
        old = {"until": "2023-12-31", "tenant": "bank"}
        first = http.get("/console/decisions", params=old)
        assert f"{PAGE_SIZE + 5} decisions match; showing 1 to {PAGE_SIZE}" in first.text
        assert "Page 1 of 2" in first.text
        assert len(decision_ids(first.text)) == PAGE_SIZE
        older = re.search(r'href="/console/decisions\?([^"]+)" rel="next"', first.text)
        assert older
        second = http.get("/console/decisions?" + older.group(1).replace("&amp;", "&"))
        assert f"showing {PAGE_SIZE + 1} to {PAGE_SIZE + 5}" in second.text
        assert decision_ids(second.text) == [f"{n:032x}" for n in range(4, -1, -1)]  # newest first


def test_a_decision_shows_its_reasoning_and_the_policy_text_that_judged_it(site: Site, tmp_path: Path) -> None:
    traffic(site)
    with signed_in(site, ADMIN_KEY) as http:
        listing = http.get("/console/decisions", params={"tenant": "bank", "verdict": "unsafe"})
        (decision_id,) = decision_ids(listing.text)
        page = http.get(f"/console/decisions/{decision_id}").text
    assert "It violates U2 - Weapons &amp; Illegal Tactics." in page  # the guard's reasoning
    assert "Help me rob the vault" in page
    policy_text = (tmp_path / "bank-policy.yaml").read_text(encoding="utf-8")
    shown = re.search(r'<pre data-testid="policy-text">(.*?)</pre>', page, re.DOTALL)
    assert shown
    assert shown.group(1).replace("&amp;", "&").replace("&#39;", "'") == policy_text


def test_policy_versions_side_by_side_with_their_decision_counts(site: Site) -> None:
    old_text = "id: bank-policy\ncategories:\n- id: U1\n  action: block\n"
    new_text = "id: bank-policy\ncategories:\n- id: U1\n  action: flag\n- id: U9\n"
    store = site.store()
    try:
        store.record_policy(PolicyVersion("bank", "bank-policy", "aaaaaaaaaaaaaaaa", 1_700_000_000.0, old_text))
        store.record_policy(PolicyVersion("bank", "bank-policy", "bbbbbbbbbbbbbbbb", 1_700_000_100.0, new_text))
        store.write([record(f"a{n:031x}", policy_version="aaaaaaaaaaaaaaaa") for n in range(3)])
        store.write([record(f"b{n:031x}", policy_version="bbbbbbbbbbbbbbbb") for n in range(2)])
    finally:
        store.close()
    with signed_in(site, ADMIN_KEY) as http:
        page = http.get(
            "/console/policies", params={"tenant": "bank", "old": "aaaaaaaaaaaaaaaa", "new": "bbbbbbbbbbbbbbbb"}
        ).text
        unknown = http.get("/console/policies", params={"tenant": "bank", "old": "cccccccccccccccc"})
    assert "aaaaaaaaaaaaaaaa (3 decisions) → bbbbbbbbbbbbbbbb (2 decisions)" in page
    assert "2 lines differ." in page
    assert re.search(r'<tr class="changed">.*?action: block.*?action: flag', page, re.DOTALL)
    assert re.search(r'<tr class="added">.*?- id: U9', page, re.DOTALL)
    assert unknown.status_code == 400
    assert "no policy version cccccccccccccccc" in unknown.text


def test_side_by_side_pairs_replaced_lines_and_keeps_the_rest() -> None:
    rows = side_by_side("a\nb\nc\n", "a\nB\nc\nd\n")
    assert [(row.change, row.old, row.new) for row in rows] == [
        ("same", "a", "a"),
        ("changed", "b", "B"),
        ("same", "c", "c"),
        ("added", None, "d"),
    ]
    assert [(row.change, row.old_number, row.new_number) for row in side_by_side("x\ny\n", "y\n")] == [
        ("removed", 1, None),
        ("same", 2, 1),
    ]


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"verdict": "maybe"}, "verdict"),
        ({"action": "drop"}, "action"),
        ({"side": "both"}, "side"),
        ({"since": "last week"}, "since"),
        ({"since": "2025-02-01", "until": "2025-01-01"}, "until"),
        ({"page": "-1"}, "page"),
        ({"page": "\u00b2"}, "page"),  # a digit to str.isdigit, not to int()
        ({"category": "x" * 201}, "category"),
    ],
)
def test_a_filter_that_cannot_be_used_is_named(given: dict[str, str], problem: str) -> None:
    assert list(read_filters(given, None).problems) == [problem]


def test_filters_make_the_query() -> None:
    filters = read_filters({"tenant": "bank", "verdict": "unsafe", "since": "2025-01-02T03:04", "page": "3"}, ("bank",))
    query = filters.query
    assert (query.tenant, query.verdict, query.tenants) == ("bank", "unsafe", ("bank",))
    assert query.since == parse_time("2025-01-02T03:04+00:00")
    assert (query.limit, query.offset) == (PAGE_SIZE, 2 * PAGE_SIZE)
    assert read_filters({"until": "2025-01-02"}, None).query.until == parse_time("2025-01-03")  # the whole day
    assert read_filters({"until": "2025-01-02T10:00"}, None).query.until == parse_time("2025-01-02T10:00")
    assert filters.link(4) == "tenant=bank&verdict=unsafe&since=2025-01-02T03%3A04&page=4"
    assert query == DecisionQuery(
        tenant="bank", verdict="unsafe", since=query.since, limit=PAGE_SIZE, offset=2 * PAGE_SIZE, tenants=("bank",)
    )


# -- tenants ----------------------------------------------------------------------------------------------------


def test_a_tenant_key_sees_its_own_tenant_only(site: Site, guard: ScriptedGuard) -> None:
    traffic(site)
    with signed_in(site, ADMIN_KEY) as admin:
        shop_ids = decision_ids(admin.get("/console/decisions", params={"tenant": "shop"}).text)
    assert shop_ids
    with signed_in(site, BANK_KEY) as http:
        own = http.get("/console/decisions")
        assert "5 decisions match" in own.text
        assert "<td>shop</td>" not in own.text
        assert http.get("/console/decisions", params={"tenant": "bank"}).status_code == 200
        refusals = [
            http.get("/console/decisions", params={"tenant": "shop"}),
            http.get("/console/policies", params={"tenant": "shop"}),
            http.get("/console/playground", params={"tenant": "shop"}),
        ]
        assert [answer.status_code for answer in refusals] == [403, 403, 403]
        assert all("This key sees tenant bank only, not shop." in answer.text for answer in refusals)
        other = http.get(f"/console/decisions/{shop_ids[0]}")
        assert other.status_code == 404
        judged = len(guard.judged())
        token = csrf_of(own.text)
        tried = http.post("/console/playground", data={"csrf": token, "tenant": "shop", "side": "input", "text": "hi"})
        assert tried.status_code == 403
        assert len(guard.judged()) == judged
        tenants = http.get("/console/tenants").text
        assert "<td>bank</td>" in tenants and "<td>shop</td>" not in tenants
        assert "Policy edits rejected since start" not in tenants  # the admin's view only


def test_the_tenants_page_shows_each_policy_in_force_and_rejected_edits(make_proxy: MakeProxy, tmp_path: Path) -> None:
    site = start_site(make_proxy, tmp_path, policy_reload_s=0.05)
    with signed_in(site, ADMIN_KEY) as http:
        before = http.get("/console/tenants").text
        assert re.search(r"<td>bank</td><td>bank-policy</td><td><code>[0-9a-f]{16}</code>", before)
        assert 'class="pill block">rejected' not in before
        (tmp_path / "bank-policy.yaml").write_text("id: bank-policy\ncategories: []\n", encoding="utf-8")
        deadline = time.monotonic() + 10
        while 'class="pill block">rejected' not in (page := http.get("/console/tenants").text):
            assert time.monotonic() < deadline, "the rejected edit never showed"
            time.sleep(0.05)
    assert "bank-policy.yaml" in page
    assert "categories" in page  # the problem, with where it is
    assert "Policy edits rejected since start: 1." in page
    with signed_in(site, BANK_KEY) as http:
        own = http.get("/console/tenants").text
    assert "bank-policy.yaml:2: categories" in own
    assert str(tmp_path) not in own  # where the files live is the admin's business


# -- the playground ---------------------------------------------------------------------------------------------


def test_the_playground_screens_with_the_proxys_own_guard_and_the_tenants_policy(
    site: Site, guard: ScriptedGuard, tmp_path: Path
) -> None:
    with signed_in(site, ADMIN_KEY) as http:
        token = csrf_of(http.get("/console/playground").text)
        unsafe = http.post(
            "/console/playground", data={"csrf": token, "tenant": "bank", "side": "input", "text": f"a {UNSAFE} b"}
        ).text
        answer = http.post(
            "/console/playground",
            data={"csrf": token, "tenant": "shop", "side": "output", "text": "Sure, here it is.", "prompt": "Q?"},
        ).text
        empty = http.post("/console/playground", data={"csrf": token, "tenant": "bank", "side": "input", "text": " "})
        nobody = http.post(
            "/console/playground", data={"csrf": token, "tenant": "nobody", "side": "input", "text": "x"}
        )
    assert re.search(r'data-testid="verdict"><span class="pill unsafe">unsafe', unsafe)
    assert re.search(r'data-testid="action"><span class="pill block">block', unsafe)
    assert 'data-testid="categories">U2<' in unsafe
    assert "It violates U2" in unsafe
    assert re.search(r'data-testid="latency">\d+\.\d ms', unsafe)
    assert any(f"a {UNSAFE} b" in text for text in guard.judged("input"))
    assert re.search(r'data-testid="verdict"><span class="pill safe">safe', answer)
    assert "Sure, here it is." in guard.judged("output")[-1]
    assert (empty.status_code, nobody.status_code) == (400, 400)
    assert "There is no tenant &#39;nobody&#39;." in nobody.text
    store = site.store()
    try:
        assert store.count(DecisionQuery()) == 0  # a trial is not traffic
    finally:
        store.close()


def test_a_trial_neither_reads_nor_writes_the_tenants_verdict_cache(site: Site, guard: ScriptedGuard) -> None:
    tried, sent = "Is a fixed-rate mortgage wise?", "What does an overdraft cost?"

    def judged(text: str) -> int:
        return sum(text in judged for judged in guard.judged("input"))

    with signed_in(site, BANK_KEY) as http:
        token = csrf_of(http.get("/console/playground").text)

        def trial(text: str) -> str:
            answer = http.post(
                "/console/playground", data={"csrf": token, "tenant": "bank", "side": "input", "text": text}
            )
            assert answer.status_code == 200, answer.text
            return answer.text

        first = trial(tried)
        # the trial's safe verdict is not remembered: traffic with the same text is judged by the guard
        assert site.ask("bank", tried) is not None
        assert judged(tried) == 2
        # a verdict traffic left in the cache does not answer a trial
        assert site.ask("bank", sent) is not None
        seeded = judged(sent)
        again = trial(sent)
        assert judged(sent) == seeded + 1
        assert site.ask("bank", sent) is not None and judged(sent) == seeded + 1  # traffic's own cache still works
    for page in (first, again):
        assert re.search(r'data-testid="verdict"><span class="pill safe">safe', page)


def test_playground_screens_in_flight_are_capped(site: Site, guard: ScriptedGuard) -> None:
    guard.delay_s = 1.0
    form = {"tenant": "shop", "side": "input", "text": "Do you ship to Iceland?"}
    with signed_in(site, ADMIN_KEY) as http, ThreadPoolExecutor(2) as pool:
        token = csrf_of(http.get("/console/playground").text)

        def trial() -> httpx.Response:
            return http.post("/console/playground", data={**form, "csrf": token})

        running = [pool.submit(trial) for _ in range(2)]  # the default cap: 2
        deadline = time.monotonic() + 5
        while len(guard.judged()) < 2:
            assert time.monotonic() < deadline, "the two trials did not reach the guard"
            time.sleep(0.01)
        full = trial()
        assert [future.result().status_code for future in running] == [200, 200]
        guard.delay_s = 0.0
        after = trial()
    assert full.status_code == 429
    assert full.headers["retry-after"] == "1"
    assert "The playground is busy" in full.text and "console.playground_in_flight" in full.text
    assert len(guard.judged()) == 3  # the refused trial never reached the guard
    assert after.status_code == 200


def test_without_the_audit_log_the_console_says_so_and_the_playground_still_works(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    site = start_site(make_proxy, tmp_path, audit={"enabled": False})
    with signed_in(site, ADMIN_KEY) as http:
        decisions = http.get("/console/decisions")
        versions = http.get("/console/policies")
        missing = http.get("/console/decisions/0123456789abcdef0123456789abcdef")
        tenants = http.get("/console/tenants")
        trial = http.post(
            "/console/playground",
            data={"csrf": csrf_of(tenants.text), "tenant": "shop", "side": "input", "text": f"x {UNSAFE}"},
        )
    assert decisions.status_code == versions.status_code == 200
    assert "The decision store is off" in decisions.text and "The decision store is off" in versions.text
    assert missing.status_code == 404
    assert "<td>shop</td><td>shop-policy</td>" in tenants.text
    assert re.search(r'data-testid="verdict"><span class="pill unsafe">unsafe', trial.text)


# -- configuration ----------------------------------------------------------------------------------------------


def test_console_settings_are_checked_with_their_line(tmp_path: Path) -> None:
    config = {
        "tenants": [{"id": "bank", "anonymous": True}],
        "console": {"enabled": True, "admin_key": sha(ADMIN_KEY), "tenant_keys": {sha(BANK_KEY): "shop"}},
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    with pytest.raises(FileInvalid) as raised:
        load_settings(path, env={})
    assert "'shop' is not one of the tenants" in str(raised.value)
    line = path.read_text(encoding="utf-8").splitlines().index(f"    {sha(BANK_KEY)}: shop") + 1
    assert f"proxy.yaml:{line}: console.tenant_keys" in str(raised.value)
    for console, why in (
        ({"enabled": True}, "needs admin_key or tenant_keys"),
        ({"admin_key": "the-key-itself"}, "never the key itself"),
        ({"session_secret": "short"}, "at least 32 characters"),
        ({"playground_in_flight": 0}, "playground_in_flight must be at least 1"),
    ):
        path.write_text(yaml.safe_dump({"console": console}), encoding="utf-8")
        with pytest.raises(FileInvalid, match=why):
            load_settings(path, env={})
