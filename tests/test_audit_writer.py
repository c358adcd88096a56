"""The audit writer on real SQLite stores: batches written off the caller's thread, a slow store (another process's
transaction holding the file's write lock) and a failing one (a path that cannot be a database) never make
`submit` wait, what is not written is counted by reason, retention is applied, and closing writes what is
queued."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from rsafe_proxy.audit.record import DecisionQuery, DecisionRecord, PolicyVersion
from rsafe_proxy.audit.sqlite import SqliteStore
from rsafe_proxy.audit.writer import AuditWriter, Retention
from rsafe_proxy.telemetry.metrics import AuditCounters
from tests.sdk import wait_until


def decision(number: int, at: float | None = None) -> DecisionRecord:
    return DecisionRecord(
        f"{number:032x}", 0, time.time() if at is None else at, "bank", "/v1/chat/completions", "input", "unsafe",
        0.9, ("U2",), "block", "p", "v1", "openai", 3.0, False,
    )  # fmt: skip


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_decisions_are_written_in_batches_and_counted(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    store = SqliteStore(tmp_path / "decisions.db")
    writer = AuditWriter(store, counters=AuditCounters(registry), batch_size=50, flush_every_s=0.05).start()
    writer.submit_policy(PolicyVersion("bank", "p", "v1", time.time(), "id: p"))
    for number in range(120):
        writer.submit(decision(number))
    assert writer.flush(10)
    reader = SqliteStore(tmp_path / "decisions.db")
    assert reader.count(DecisionQuery(tenant="bank", category="U2")) == 120
    assert [count for _, count in reader.policy_versions("bank")] == [120]
    assert counted(registry, "rsafe_audit_written_total") == 120
    assert counted(registry, "rsafe_audit_dropped_total", reason="queue_full") == 0
    writer.close()
    reader.close()


def test_a_slow_store_never_makes_submit_wait_and_the_overflow_is_counted(tmp_path: Path) -> None:
    path = tmp_path / "decisions.db"
    SqliteStore(path).write([decision(0)])  # the schema exists; now another process holds the write lock
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    registry = CollectorRegistry()
    store = SqliteStore(path, busy_timeout_s=1.0)
    writer = AuditWriter(store, counters=AuditCounters(registry), max_queue=20, batch_size=5, flush_every_s=0.01)
    writer.start()
    slowest = 0.0
    for number in range(1, 201):
        started = time.perf_counter()
        writer.submit(decision(number))
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.05  # a request's share of the audit log: a put in a queue, never a wait on the store
    dropped = counted(registry, "rsafe_audit_dropped_total", reason="queue_full")
    assert dropped >= 200 - 20 - 5
    holder.execute("COMMIT")
    holder.close()
    assert writer.flush(30)
    written = counted(registry, "rsafe_audit_written_total")
    errors = counted(registry, "rsafe_audit_dropped_total", reason="store_error")
    assert written + errors + dropped == 200  # every decision written or counted, none lost without a word
    writer.close()
    assert SqliteStore(path).count(DecisionQuery()) == 1 + written


def test_a_failing_store_drops_counts_and_keeps_going(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    registry = CollectorRegistry()
    writer = AuditWriter(
        SqliteStore(blocker / "decisions.db"), counters=AuditCounters(registry), flush_every_s=0.01
    ).start()
    for number in range(30):
        writer.submit(decision(number))
    assert writer.flush(10)
    assert counted(registry, "rsafe_audit_dropped_total", reason="store_error") == 30
    assert counted(registry, "rsafe_audit_written_total") == 0
    assert writer.dropped == 30
    writer.close()


def test_closing_writes_everything_queued_then_refuses_more(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    path = tmp_path / "decisions.db"
    writer = AuditWriter(SqliteStore(path), counters=AuditCounters(registry), flush_every_s=5.0).start()
    for number in range(300):
        writer.submit(decision(number))
    writer.close()
    assert SqliteStore(path).count(DecisionQuery()) == 300
    writer.submit(decision(301))
    assert counted(registry, "rsafe_audit_dropped_total", reason="shutdown") == 1


def test_retention_is_applied_by_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "decisions.db"
    old = time.time() - 10 * 86_400
    SqliteStore(path).write([decision(number, at=old + number) for number in range(10)])
    writer = AuditWriter(
        SqliteStore(path), retention=Retention(max_age_s=86_400, max_rows=5), flush_every_s=0.01, prune_every_s=0.05
    ).start()
    for number in range(10, 20):
        writer.submit(decision(number))
    reader = SqliteStore(path)
    assert wait_until(lambda: reader.count(DecisionQuery()) == 5, 10)
    assert {record.decision_id for record in reader.query(DecisionQuery())} == {f"{n:032x}" for n in range(15, 20)}
    writer.close()
    reader.close()
