"""What the audit log holds and how it is asked: one row per screening decision, plain frozen data.

A decision id is the request's id (`x-rsafe-decision-id`); one request can make several decisions (its input,
its answer, each judged window of a stream), told apart by `side` and `seq`. The id is the trace id, which a caller's
trace context may share across requests (an agent's calls): the store numbers a later request's screens on past
the id's last `seq`, so that no decision passes for one already kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One screening decision as the audit log keeps it. Times are Unix seconds (UTC)."""

    decision_id: str
    seq: int
    time: float
    tenant: str
    route: str
    side: str  # "input" | "output"
    verdict: str  # "safe" | "unsafe" | "unknown"
    score: float | None
    categories: tuple[str, ...]
    action: str  # "allow" | "block" | "rewrite" | "flag"
    policy_id: str
    policy_version: str
    engine: str
    latency_ms: float
    cache_hit: bool
    reasoning: str | None = None  # only where the policy allows capture
    excerpt: str | None = None  # only where the policy allows capture


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """A policy text as it judged: kept once per (tenant, policy id, version), first seen at `time`."""

    tenant: str
    policy_id: str
    version: str
    time: float
    source: str  # the policy file's text (YAML) as loaded


@dataclass(frozen=True, slots=True)
class DecisionQuery:
    """Filters (all optional, combined with AND), newest first, paged by `limit` and `offset`."""

    tenant: str | None = None
    verdict: str | None = None
    action: str | None = None
    side: str | None = None
    category: str | None = None
    policy_version: str | None = None
    since: float | None = None
    until: float | None = None
    decision_id: str | None = None
    limit: int = 50
    offset: int = 0
    tenants: tuple[str, ...] | None = field(default=None)  # restrict to these tenants (a tenant's console key)


class DecisionStore(Protocol):
    """The audit log's one interface: SQLite and PostgreSQL implement it. Calls block; the proxy makes them off
    the request path (a writer thread) and the console from a worker thread."""

    def write(self, records: Sequence[DecisionRecord]) -> None:
        """Store a batch in one transaction (the very same decision stored again is kept once, as it was)."""

    def record_policy(self, version: PolicyVersion) -> None:
        """Keep a policy text the first time its (tenant, policy id, version) is seen."""

    def query(self, query: DecisionQuery) -> list[DecisionRecord]:
        """The decisions that match, newest first, one page."""

    def count(self, query: DecisionQuery) -> int:
        """How many decisions match (ignoring limit and offset)."""

    def get(self, decision_id: str) -> list[DecisionRecord]:
        """Every decision of one request, in the order they were made; empty when unknown."""

    def policy_versions(self, tenant: str) -> list[tuple[PolicyVersion, int]]:
        """A tenant's policy versions, newest first, each with how many decisions it made."""

    def prune(self, *, max_age_s: float | None, max_rows: int | None, now: float) -> int:
        """Drop decisions older than `max_age_s` and the oldest beyond `max_rows`; how many were dropped."""

    def close(self) -> None:
        """Release the connection(s)."""
