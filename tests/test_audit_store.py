"""The decision store, one suite run against a real SQLite file and a real PostgreSQL server on loopback:
round trips, every filter (each checked against the same filter applied in Python to the same records), paging,
policy versions, retention, forward migrations, and several processes writing one SQLite file."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rsafe_proxy.audit import open_store, store_url
from rsafe_proxy.audit.record import DecisionQuery, DecisionRecord, PolicyVersion
from rsafe_proxy.audit.sql import SCHEMA_VERSION, SchemaTooNew, SqlStore
from rsafe_proxy.audit.sqlite import SqliteStore
from rsafe_proxy.config import AuditSettings
from tests.databases import PostgresServer, postgres_server

NOW = 1_750_000_000.0


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


StoreFactory = Callable[[], SqlStore]


@pytest.fixture(params=["sqlite", "postgres"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Makes stores on one database (a second call: another connection to the same one, as another worker)."""
    if request.param == "sqlite":
        url = str(tmp_path / "audit" / "decisions.db")
    else:
        url = request.getfixturevalue("postgres").database()
    made: list[SqlStore] = []

    def make() -> SqlStore:
        store = open_store(AuditSettings(url=url))
        assert isinstance(store, SqlStore)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(new_store: StoreFactory) -> SqlStore:
    return new_store()


def record(number: int, **fields: object) -> DecisionRecord:
    """A decision; its fields vary with `number` so that every filter splits the set."""
    values: dict[str, object] = {
        "decision_id": f"{number // 2:032x}",
        "seq": number % 2,
        "time": NOW + number,
        "tenant": ("bank", "shop", "health")[number % 3],
        "route": "/v1/chat/completions",
        "side": ("input", "output")[number % 2],
        "verdict": ("safe", "unsafe", "unknown")[number % 3 if number % 5 else 1],
        "score": None if number % 4 == 0 else (number % 10) / 10,
        "categories": (("U1",), ("U10",), ("U1", "U2"), ())[number % 4],
        "action": ("allow", "block", "flag", "rewrite", "guard_error_block")[number % 5],
        "policy_id": "p",
        "policy_version": ("v1", "v2")[number % 2],
        "engine": "openai",
        "latency_ms": 10.0 + number,
        "cache_hit": number % 3 == 0,
        "reasoning": f"because {number}" if number % 2 else None,
        "excerpt": f"text {number}" if number % 3 == 1 else None,
    }
    values.update(fields)
    return DecisionRecord(**values)  # type: ignore[arg-type]


RECORDS = [record(number) for number in range(40)]


def matches(query: DecisionQuery, item: DecisionRecord) -> bool:
    """The filter's meaning, written plainly (what each store must agree with)."""
    return (
        all(
            wanted is None or getattr(item, name) == wanted
            for name, wanted in (
                ("tenant", query.tenant),
                ("verdict", query.verdict),
                ("action", query.action),
                ("side", query.side),
                ("policy_version", query.policy_version),
                ("decision_id", query.decision_id),
            )
        )
        and (query.category is None or query.category in item.categories)
        and (query.since is None or item.time >= query.since)
        and (query.until is None or item.time < query.until)
        and (query.tenants is None or item.tenant in query.tenants)
    )


def newest_first(items: list[DecisionRecord]) -> list[DecisionRecord]:
    return sorted(items, key=lambda item: (item.time, item.decision_id, item.seq), reverse=True)


def test_a_decision_reads_back_as_it_was_written(store: SqlStore) -> None:
    store.write(RECORDS)
    for item in RECORDS[:6]:
        assert item in store.get(item.decision_id)
    assert store.get(RECORDS[3].decision_id) == sorted(
        [item for item in RECORDS if item.decision_id == RECORDS[3].decision_id], key=lambda item: item.seq
    )
    assert store.get("f" * 32) == []
    assert store.count(DecisionQuery()) == len(RECORDS)


def test_a_decision_already_stored_is_kept_as_it_was(store: SqlStore) -> None:
    first = RECORDS[1]
    store.write([first])
    store.write([dataclasses.replace(first, verdict="safe", categories=("U9",)), RECORDS[2]])
    assert store.get(first.decision_id) == [first]
    assert store.get(RECORDS[2].decision_id) == [RECORDS[2]]
    assert store.count(DecisionQuery(category="U9")) == 0


def test_requests_that_continue_one_trace_each_keep_their_decisions(store: SqlStore) -> None:
    # the decision id is the trace id, and a caller's W3C trace context sets it: an agent's calls in one trace
    # share it, each numbering its screens from 0. A later request must not pass for one already stored.
    trace = "ab" * 16
    store.write([record(0, decision_id=trace, seq=0), record(1, decision_id=trace, seq=1)])  # input, output
    blocked = record(2, decision_id=trace, seq=0, side="input", action="block", categories=("U2",))
    store.write([blocked, record(4, decision_id=trace, seq=0, side="input")])  # two more in one batch
    kept = store.get(trace)
    assert sorted(item.time for item in kept) == [NOW, NOW + 1, NOW + 2, NOW + 4]
    assert len({(item.side, item.seq) for item in kept}) == 4
    assert store.count(DecisionQuery(decision_id=trace, action="block", category="U2")) == 1
    store.write([record(0, decision_id=trace, seq=0)])  # the very same decision again: still kept once
    assert store.count(DecisionQuery(decision_id=trace)) == 4


def test_text_a_database_cannot_hold_costs_no_decision(store: SqlStore) -> None:
    # a guard quoting a prompt can put NUL (PostgreSQL refuses it) or a lone surrogate (not UTF-8) in the reasoning
    odd = record(1, reasoning="quoted \x00 and \ud800 here", excerpt="\x00")
    store.write([record(0), odd, record(2)])
    assert store.count(DecisionQuery()) == 3
    (kept,) = [item for item in store.get(odd.decision_id) if item.seq == odd.seq]
    assert (kept.reasoning, kept.excerpt) == ("quoted \ufffd and \ufffd here", "\ufffd")


def test_a_huge_page_is_an_empty_page(store: SqlStore) -> None:
    store.write(RECORDS[:3])
    assert store.query(DecisionQuery(limit=10**20)) == newest_first(RECORDS[:3])
    assert store.query(DecisionQuery(offset=10**20)) == []


QUERIES = [
    DecisionQuery(),
    DecisionQuery(tenant="bank"),
    DecisionQuery(verdict="unsafe"),
    DecisionQuery(action="block"),
    DecisionQuery(side="output"),
    DecisionQuery(category="U1"),  # exact: never U10
    DecisionQuery(category="U10"),
    DecisionQuery(category="U"),
    DecisionQuery(policy_version="v2"),
    DecisionQuery(since=NOW + 10, until=NOW + 20),  # since inclusive, until exclusive
    DecisionQuery(decision_id=f"{7:032x}"),
    DecisionQuery(tenant="bank", verdict="unsafe", side="input"),
    DecisionQuery(tenants=("bank", "health"), action="allow"),
    DecisionQuery(tenants=()),
    DecisionQuery(tenant="shop", tenants=("bank",)),
    DecisionQuery(category="U2", since=NOW + 5, limit=3),
]


@pytest.mark.parametrize("query", QUERIES, ids=lambda query: repr(query)[14:60])
def test_every_filter_selects_what_it_says(store: SqlStore, query: DecisionQuery) -> None:
    store.write(RECORDS)
    expected = newest_first([item for item in RECORDS if matches(query, item)])
    assert store.count(query) == len(expected)
    assert store.query(query) == expected[: query.limit]


def test_pages_follow_each_other_newest_first(store: SqlStore) -> None:
    store.write(RECORDS)
    pages = [store.query(DecisionQuery(limit=7, offset=offset)) for offset in range(0, 42, 7)]
    assert [item for page in pages for item in page] == newest_first(RECORDS)
    assert [len(page) for page in pages] == [7, 7, 7, 7, 7, 5]


def test_policy_versions_are_kept_once_with_their_decision_counts(store: SqlStore) -> None:
    store.write(RECORDS)
    store.record_policy(PolicyVersion("bank", "p", "v1", NOW, "id: p\n# one"))
    store.record_policy(PolicyVersion("bank", "p", "v2", NOW + 50, "id: p\n# two"))
    store.record_policy(PolicyVersion("bank", "p", "v1", NOW + 99, "id: p\n# changed text, same version"))
    store.record_policy(PolicyVersion("shop", "p", "v1", NOW, "id: p"))
    versions = store.policy_versions("bank")
    bank = [item for item in RECORDS if item.tenant == "bank"]
    assert versions == [
        (PolicyVersion("bank", "p", "v2", NOW + 50, "id: p\n# two"), sum(i.policy_version == "v2" for i in bank)),
        (PolicyVersion("bank", "p", "v1", NOW, "id: p\n# one"), sum(i.policy_version == "v1" for i in bank)),
    ]
    assert store.policy_versions("nobody") == []


def test_retention_drops_by_age_then_by_rows(store: SqlStore) -> None:
    store.write(RECORDS)
    assert store.prune(max_age_s=None, max_rows=None, now=NOW + 100) == 0
    # older than 30 s at NOW + 40: records 0..9 go
    assert store.prune(max_age_s=30, max_rows=None, now=NOW + 40) == 10
    assert store.prune(max_age_s=None, max_rows=12, now=NOW + 40) == 18
    assert store.query(DecisionQuery(limit=100)) == newest_first(RECORDS[28:])
    # the categories of pruned decisions went with them
    assert store.count(DecisionQuery(category="U1")) == sum("U1" in item.categories for item in RECORDS[28:])


def test_an_old_schema_migrates_forward_keeping_its_rows(new_store: StoreFactory) -> None:
    old = new_store()
    assert old.migrate(target=1) == 1
    with old._transaction(writing=True) as cursor:  # a row as version 1 wrote it (no excerpt column then)
        cursor.execute(
            old._sql(
                "INSERT INTO decisions (decision_id, seq, side, time, tenant, route, verdict, score, categories, "
                "action, policy_id, policy_version, engine, latency_ms, cache_hit, reasoning) "
                "VALUES (?, 0, 'input', ?, 'bank', '/v1/chat/completions', 'unsafe', 0.9, ?, 'block', 'p', 'v1', "
                "'openai', 12.5, ?, 'old reasoning')"
            ),
            ("a" * 32, NOW, json.dumps(["U1"]), False),
        )
    old.close()
    assert old.schema_version() == 1
    current = new_store()
    rows = current.query(DecisionQuery(decision_id="a" * 32))
    assert current.schema_version() == SCHEMA_VERSION
    assert [(row.verdict, row.reasoning, row.excerpt, row.cache_hit) for row in rows] == [
        ("unsafe", "old reasoning", None, False)
    ]
    current.write([record(3, decision_id="b" * 32, excerpt="new text")])
    assert current.get("b" * 32)[0].excerpt == "new text"


def test_a_store_from_a_newer_version_is_refused(store: SqlStore) -> None:
    store.write(RECORDS[:1])
    with store._transaction(writing=True) as cursor:
        cursor.execute(store._sql("UPDATE schema_version SET version = ?"), (SCHEMA_VERSION + 5,))
    store._schema_ready = False
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 5}"):
        store.count(DecisionQuery())


def test_two_connections_see_each_others_writes(new_store: StoreFactory) -> None:
    writer, reader = new_store(), new_store()
    writer.write(RECORDS[:5])
    assert reader.count(DecisionQuery()) == 5
    writer.write(RECORDS[5:9])
    assert reader.count(DecisionQuery()) == 9


# -- SQLite specifics ----------------------------------------------------------------------------------------

_WRITER = """
import sys, time
from pathlib import Path
from rsafe_proxy.audit.record import DecisionRecord
from rsafe_proxy.audit.sqlite import SqliteStore

path, name, start = sys.argv[1], sys.argv[2], Path(sys.argv[3])
while not start.exists():
    time.sleep(0.005)
store = SqliteStore(path)
for batch in range(40):
    store.write([
        DecisionRecord(f"{name}-{batch}", seq, time.time(), name, "/v1/chat/completions", "input", "safe", 0.1,
                       ("U1",), "allow", "p", "v1", "openai", 1.0, False)
        for seq in range(25)
    ])
store.close()
print("done")
"""


def test_several_processes_write_one_sqlite_file(tmp_path: Path) -> None:
    path, start = tmp_path / "decisions.db", tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), name, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("worker-a", "worker-b", "worker-c")
    ]
    start.touch()  # all at once: the file and its schema are created by whichever comes first
    outcomes = [worker.communicate(timeout=120) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], [err for _, err in outcomes]
    store = SqliteStore(path)
    try:
        assert store.count(DecisionQuery()) == 3 * 40 * 25
        for name in ("worker-a", "worker-b", "worker-c"):
            assert store.count(DecisionQuery(tenant=name, category="U1")) == 40 * 25
        assert store.schema_version() == SCHEMA_VERSION
    finally:
        store.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_sqlite_file_is_private_and_its_directory_made(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state" / "decisions.db"
    store = SqliteStore(path)
    store.write(RECORDS[:1])
    store.close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_a_sqlite_write_waits_for_another_writer_within_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "decisions.db"
    SqliteStore(path).write(RECORDS[:1])
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waiting = SqliteStore(path, busy_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        waiting.write(RECORDS[1:2])
    assert 0.25 < time.monotonic() - started < 5
    holder.execute("COMMIT")
    waiting.write(RECORDS[1:2])  # the connection is usable again after the failed write
    assert waiting.count(DecisionQuery()) == 2
    holder.close()
    waiting.close()


# -- where the store is --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RSAFE_STATE_DIR": "/srv/rsafe", "XDG_STATE_HOME": "/x", "HOME": "/home/u"}, "/srv/rsafe/decisions.db"),
        ({"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}, "/x/state/rsafe-proxy/decisions.db"),
    ],
)
def test_the_default_store_is_in_the_per_user_state_directory(env: dict[str, str], expected: str) -> None:
    assert store_url(AuditSettings(), "/somewhere/else", env) == expected


def test_without_state_variables_the_store_is_under_the_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    assert store_url(AuditSettings(), "/pkg", {}) == "/home/someone/.local/state/rsafe-proxy/decisions.db"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("audit/decisions.db", "/etc/rsafe/audit/decisions.db"),  # beside proxy.yaml, not the working directory
        ("/var/lib/rsafe/d.db", "/var/lib/rsafe/d.db"),
        ("sqlite:///rel.db", "/etc/rsafe/rel.db"),
        ("sqlite:////abs/d.db", "/abs/d.db"),
        ("postgresql://u:p@db:5432/audit", "postgresql://u:p@db:5432/audit"),
    ],
)
def test_a_configured_url_is_read_as_written(url: str, expected: str) -> None:
    assert store_url(AuditSettings(url=url), "/etc/rsafe", {}) == expected


def test_an_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="not a mysql URL"):
        AuditSettings(url="mysql://db/audit")
