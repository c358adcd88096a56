"""The SQL both decision stores speak: the schema as forward migrations, and every query. SQLite and PostgreSQL
differ only in how they connect and open a transaction (sqlite.py, postgres.py); what they store and how it is
asked lives here, once.

Times are Unix seconds; a query's `since` is inclusive and its `until` exclusive. A decision's categories are kept
twice: as a JSON list in its row (read back as they were) and one row each in `decision_categories`, so that the
category filter is an exact, indexed match (`U1` never matches `U10`).

A decision id is a trace id, which a caller's W3C trace context sets: several requests of one trace (an agent's
calls) share it, each numbering its screens from 0. A screen whose (id, side, seq) another request already took
is stored under the id's next free seq; only the very same decision (same key and time) is kept once. Text is
stored as both databases can hold it: NUL and lone surrogates become U+FFFD."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from rsafe_proxy.audit.record import DecisionQuery, DecisionRecord, PolicyVersion

# The schema, one step per version, applied in order and never edited once released: a change is a new step.
# The types read the same in both databases (DOUBLE PRECISION and BOOLEAN have SQLite affinities).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: decisions, their categories, the policy texts that judged them
        """CREATE TABLE decisions (
            decision_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            side TEXT NOT NULL,
            time DOUBLE PRECISION NOT NULL,
            tenant TEXT NOT NULL,
            route TEXT NOT NULL,
            verdict TEXT NOT NULL,
            score DOUBLE PRECISION,
            categories TEXT NOT NULL,
            action TEXT NOT NULL,
            policy_id TEXT NOT NULL,
            policy_version TEXT NOT NULL,
            engine TEXT NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL,
            cache_hit BOOLEAN NOT NULL,
            reasoning TEXT,
            PRIMARY KEY (decision_id, side, seq)
        )""",
        """CREATE TABLE decision_categories (
            decision_id TEXT NOT NULL,
            side TEXT NOT NULL,
            seq INTEGER NOT NULL,
            category TEXT NOT NULL,
            PRIMARY KEY (decision_id, side, seq, category),
            FOREIGN KEY (decision_id, side, seq) REFERENCES decisions (decision_id, side, seq) ON DELETE CASCADE
        )""",
        """CREATE TABLE policy_versions (
            tenant TEXT NOT NULL,
            policy_id TEXT NOT NULL,
            version TEXT NOT NULL,
            time DOUBLE PRECISION NOT NULL,
            source TEXT NOT NULL,
            PRIMARY KEY (tenant, policy_id, version)
        )""",
        "CREATE INDEX decisions_time ON decisions (time)",
    ),
    (  # 2: content excerpts, and an index for each filter the console and the CLI offer
        "ALTER TABLE decisions ADD COLUMN excerpt TEXT",
        "CREATE INDEX decisions_tenant_time ON decisions (tenant, time)",
        "CREATE INDEX decisions_action_time ON decisions (action, time)",
        "CREATE INDEX decisions_verdict_time ON decisions (verdict, time)",
        "CREATE INDEX decisions_policy ON decisions (tenant, policy_version)",
        "CREATE INDEX decision_categories_category ON decision_categories (category)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "decision_id, seq, time, tenant, route, side, verdict, score, categories, action, policy_id, policy_version, "
    "engine, latency_ms, cache_hit, reasoning, excerpt"
)
_ORDER = "d.time DESC, d.decision_id DESC, d.seq DESC"
_MAX_BIGINT = 2**63 - 1  # the largest LIMIT or OFFSET either database takes
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL (PostgreSQL refuses it) and lone surrogates (not UTF-8)
_IDS_PER_QUERY = 500


class SchemaTooNew(RuntimeError):
    """The store was written by a newer rsafe-proxy: this one cannot read it safely."""


class Cursor(Protocol):
    """What the stores use of a DB-API cursor (sqlite3 and psycopg alike)."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Any: ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]], /) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...

    @property
    def rowcount(self) -> int: ...


def storable(text: str) -> str:
    """`text` as both databases can hold it."""
    return _UNSTORABLE.sub("\ufffd", text)


def where(query: DecisionQuery) -> tuple[str, list[Any]]:
    """The WHERE clause (on `decisions d`) and its parameters for `query`'s filters."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("tenant", query.tenant),
        ("verdict", query.verdict),
        ("action", query.action),
        ("side", query.side),
        ("policy_version", query.policy_version),
        ("decision_id", query.decision_id),
    ):
        if value is not None:
            clauses.append(f"d.{column} = ?")
            params.append(storable(value))
    if query.since is not None:
        clauses.append("d.time >= ?")
        params.append(query.since)
    if query.until is not None:
        clauses.append("d.time < ?")
        params.append(query.until)
    if query.category is not None:
        clauses.append(
            "EXISTS (SELECT 1 FROM decision_categories c WHERE c.decision_id = d.decision_id AND c.side = d.side "
            "AND c.seq = d.seq AND c.category = ?)"
        )
        params.append(storable(query.category))
    if query.tenants is not None:
        if not query.tenants:
            clauses.append("1 = 0")  # restricted to no tenant: nothing
        else:
            clauses.append(f"d.tenant IN ({', '.join('?' for _ in query.tenants)})")
            params.extend(storable(tenant) for tenant in query.tenants)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _storable_record(record: DecisionRecord) -> DecisionRecord:
    def kept(text: str | None) -> str | None:
        return None if text is None else storable(text)

    return dataclasses.replace(
        record,
        decision_id=storable(record.decision_id),
        tenant=storable(record.tenant),
        route=storable(record.route),
        side=storable(record.side),
        verdict=storable(record.verdict),
        categories=tuple(storable(category) for category in record.categories),
        action=storable(record.action),
        policy_id=storable(record.policy_id),
        policy_version=storable(record.policy_version),
        engine=storable(record.engine),
        reasoning=kept(record.reasoning),
        excerpt=kept(record.excerpt),
    )


def _row(record: DecisionRecord) -> tuple[Any, ...]:
    return (
        record.decision_id,
        record.seq,
        record.time,
        record.tenant,
        record.route,
        record.side,
        record.verdict,
        record.score,
        json.dumps(list(record.categories)),
        record.action,
        record.policy_id,
        record.policy_version,
        record.engine,
        record.latency_ms,
        record.cache_hit,
        record.reasoning,
        record.excerpt,
    )


def _record(row: Sequence[Any]) -> DecisionRecord:
    categories = json.loads(row[8])
    return DecisionRecord(
        decision_id=row[0],
        seq=int(row[1]),
        time=float(row[2]),
        tenant=row[3],
        route=row[4],
        side=row[5],
        verdict=row[6],
        score=None if row[7] is None else float(row[7]),
        categories=tuple(str(category) for category in categories),
        action=row[9],
        policy_id=row[10],
        policy_version=row[11],
        engine=row[12],
        latency_ms=float(row[13]),
        cache_hit=bool(row[14]),
        reasoning=row[15],
        excerpt=row[16],
    )


class SqlStore(ABC):
    """A DecisionStore over SQL; a subclass connects and opens transactions. The schema is brought up to date
    on first use (not when the object is made: a store that cannot be reached must not stop the proxy)."""

    placeholder = "?"  # how the driver marks a parameter

    def __init__(self) -> None:
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is, for messages (never a password)."""

    @abstractmethod
    def _transaction(self, writing: bool, migrating: bool = False) -> AbstractContextManager[Cursor]:
        """One transaction on a connection held by this thread alone; committed when the block ends, rolled back
        if it raises. `migrating`: no other process may migrate until it ends."""

    def _sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def migrate(self, target: int = SCHEMA_VERSION) -> int:
        """Apply the steps after the store's version, up to `target`; returns the version it is at now."""
        with self._transaction(writing=True, migrating=True) as cursor:
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cursor.execute("SELECT version FROM schema_version")
            row = cursor.fetchone()
            current = int(row[0]) if row is not None else 0
            if row is None:
                cursor.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"), (0,))
            if current > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the decision store at {self.location} has schema version {current}; this rsafe-proxy knows "
                    f"up to {SCHEMA_VERSION}: upgrade rsafe-proxy to read it"
                )
            for version in range(current + 1, target + 1):
                for statement in MIGRATIONS[version - 1]:
                    cursor.execute(statement)
            if target > current:
                cursor.execute(self._sql("UPDATE schema_version SET version = ?"), (target,))
            return max(current, target)

    def schema_version(self) -> int:
        """The store's schema version (0: never migrated)."""
        with self._transaction(writing=False) as cursor:
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cursor.execute("SELECT version FROM schema_version")
            row = cursor.fetchone()
            return int(row[0]) if row is not None else 0

    def _session(self, writing: bool) -> AbstractContextManager[Cursor]:
        if not self._schema_ready:
            with self._schema_lock:
                if not self._schema_ready:
                    self.migrate()
                    self._schema_ready = True
        return self._transaction(writing)

    @abstractmethod
    def _serialise_writes(self, cursor: Cursor) -> None:
        """Hold off other processes' writes of decisions until this writing transaction ends."""

    def _numbered(self, cursor: Cursor, records: Sequence[DecisionRecord]) -> list[DecisionRecord]:
        """`records`, each screen of a later request of a trace already stored renumbered past the id's last seq."""
        ids = list(dict.fromkeys(record.decision_id for record in records))
        taken: dict[tuple[str, str, int], float] = {}
        last: dict[str, int] = {}
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            marks = ", ".join("?" for _ in chunk)
            cursor.execute(
                self._sql(f"SELECT decision_id, side, seq, time FROM decisions WHERE decision_id IN ({marks})"), chunk
            )
            for decision_id, side, seq, at in cursor.fetchall():
                taken[(decision_id, side, int(seq))] = float(at)
                last[decision_id] = max(last.get(decision_id, -1), int(seq))
        numbered = []
        for record in records:
            at = taken.get((record.decision_id, record.side, record.seq))
            if at is not None and at != record.time:  # another request of the same trace took this seq
                record = dataclasses.replace(record, seq=last[record.decision_id] + 1)
            taken.setdefault((record.decision_id, record.side, record.seq), record.time)
            last[record.decision_id] = max(last.get(record.decision_id, -1), record.seq)
            numbered.append(record)
        return numbered

    def write(self, records: Sequence[DecisionRecord]) -> None:
        """Store a batch in one transaction (the very same decision stored again is kept once, as it was)."""
        if not records:
            return
        marks = ", ".join("?" for _ in range(17))
        with self._session(writing=True) as cursor:
            self._serialise_writes(cursor)
            records = self._numbered(cursor, [_storable_record(record) for record in records])
            # a category row only for the decision as stored: one already there under this key keeps its own
            categories = [
                (record.decision_id, record.side, record.seq, category, row[0], row[5], row[1], row[8])
                for record, row in ((record, _row(record)) for record in records)
                for category in dict.fromkeys(record.categories)
            ]
            cursor.executemany(
                self._sql(
                    f"INSERT INTO decisions ({_COLUMNS}) VALUES ({marks}) "
                    "ON CONFLICT (decision_id, side, seq) DO NOTHING"
                ),
                [_row(record) for record in records],
            )
            if categories:
                cursor.executemany(
                    self._sql(
                        "INSERT INTO decision_categories (decision_id, side, seq, category) "
                        "SELECT ?, ?, CAST(? AS INTEGER), ? WHERE EXISTS (SELECT 1 FROM decisions WHERE "
                        "decision_id = ? AND side = ? AND seq = ? AND categories = ?) ON CONFLICT DO NOTHING"
                    ),
                    categories,
                )

    def record_policy(self, version: PolicyVersion) -> None:
        """Keep a policy text the first time its (tenant, policy id, version) is seen."""
        with self._session(writing=True) as cursor:
            cursor.execute(
                self._sql(
                    "INSERT INTO policy_versions (tenant, policy_id, version, time, source) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (tenant, policy_id, version) DO NOTHING"
                ),
                (version.tenant, version.policy_id, version.version, version.time, storable(version.source)),
            )

    def query(self, query: DecisionQuery) -> list[DecisionRecord]:
        """The decisions that match, newest first, one page."""
        clause, params = where(query)
        prefixed = ", ".join(f"d.{column.strip()}" for column in _COLUMNS.split(","))
        sql = f"SELECT {prefixed} FROM decisions d{clause} ORDER BY {_ORDER} LIMIT ? OFFSET ?"
        with self._session(writing=False) as cursor:
            limit, offset = (min(max(value, 0), _MAX_BIGINT) for value in (query.limit, query.offset))
            cursor.execute(self._sql(sql), (*params, limit, offset))
            return [_record(row) for row in cursor.fetchall()]

    def count(self, query: DecisionQuery) -> int:
        """How many decisions match (ignoring limit and offset)."""
        clause, params = where(query)
        with self._session(writing=False) as cursor:
            cursor.execute(self._sql(f"SELECT COUNT(*) FROM decisions d{clause}"), params)
            return int(cursor.fetchone()[0])

    def get(self, decision_id: str) -> list[DecisionRecord]:
        """Every decision of one request, in the order they were made; empty when unknown."""
        prefixed = ", ".join(f"d.{column.strip()}" for column in _COLUMNS.split(","))
        sql = f"SELECT {prefixed} FROM decisions d WHERE d.decision_id = ? ORDER BY d.seq, d.time"
        with self._session(writing=False) as cursor:
            cursor.execute(self._sql(sql), (storable(decision_id),))
            return [_record(row) for row in cursor.fetchall()]

    def policy_versions(self, tenant: str) -> list[tuple[PolicyVersion, int]]:
        """A tenant's policy versions, newest first, each with how many decisions it made."""
        sql = (
            "SELECT p.tenant, p.policy_id, p.version, p.time, p.source, (SELECT COUNT(*) FROM decisions d "
            "WHERE d.tenant = p.tenant AND d.policy_version = p.version AND d.policy_id = p.policy_id) "
            "FROM policy_versions p WHERE p.tenant = ? ORDER BY p.time DESC, p.version"
        )
        with self._session(writing=False) as cursor:
            cursor.execute(self._sql(sql), (storable(tenant),))
            return [
                (PolicyVersion(row[0], row[1], row[2], float(row[3]), row[4]), int(row[5])) for row in cursor.fetchall()
            ]

    def prune(self, *, max_age_s: float | None, max_rows: int | None, now: float) -> int:
        """Drop decisions older than `max_age_s` and the oldest beyond `max_rows`; how many were dropped."""
        dropped = 0
        with self._session(writing=True) as cursor:
            if max_age_s is not None:
                cursor.execute(self._sql("DELETE FROM decisions WHERE time < ?"), (now - max_age_s,))
                dropped += max(cursor.rowcount, 0)
            if max_rows is not None:
                # the time of the newest row past the limit: it and everything older goes
                cursor.execute(self._sql("SELECT time FROM decisions ORDER BY time DESC LIMIT 1 OFFSET ?"), (max_rows,))
                row = cursor.fetchone()
                if row is not None:
                    cursor.execute(self._sql("DELETE FROM decisions WHERE time <= ?"), (row[0],))
                    dropped += max(cursor.rowcount, 0)
        return dropped

    @abstractmethod
    def close(self) -> None:
        """Release the connection(s)."""
