"""The proxy's Prometheus metrics, in a registry of its own (no global state). Every label takes values from a
bounded set: configured tenants, route templates, status codes, sides, verdicts, actions, a policy's category ids
(anything else is counted as `other`), error codes."""

from __future__ import annotations

import os
import re
from typing import Any, Self

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_OVERHEAD = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def bounded(value: str, known: frozenset[str] | None = None) -> str:
    """`value` as a label: `other` when it is not one of `known` (where given) or is no plain short token."""
    if known is not None and value not in known:
        return "other"
    return value if _LABEL.fullmatch(value) else "other"


class _KeptChildren:
    """`labels(...)` answered from the children it made before: prometheus_client's own checks its arguments,
    converts each to str and takes a lock on every call, a few times a request. Values are strings (a key of
    another type is only looked up under itself: the metric's own labels() still makes its child)."""

    _kept: dict[tuple[Any, ...], Any]

    def labels(self, *values: Any, **named: Any) -> Self:
        kept = self.__dict__.setdefault("_kept", {})
        if named or (child := kept.get(values)) is None:
            child = super().labels(*values, **named)  # type: ignore[misc]  # the metric class comes after
            if not named:
                kept[values] = child
        return child  # type: ignore[no-any-return]


class Counter(_KeptChildren, prometheus_client.Counter):
    """prometheus_client's Counter, its labelled children kept."""


class Histogram(_KeptChildren, prometheus_client.Histogram):
    """prometheus_client's Histogram, its labelled children kept."""


class AuditCounters:
    """What the audit log's writer counts: decisions stored, and decisions dropped by reason (the queue was
    full, the store failed, or the proxy was shutting down)."""

    REASONS = ("queue_full", "store_error", "shutdown")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.written_total = Counter("rsafe_audit_written", "Decisions stored in the audit log", registry=registry)
        self.dropped_total = Counter(
            "rsafe_audit_dropped",
            "Decisions not stored in the audit log (traffic is never held up for it), by reason",
            ["reason"],
            registry=registry,
        )
        for reason in self.REASONS:  # every reason shown from the start, at 0
            self.dropped_total.labels(reason)

    def written(self, count: int) -> None:
        """`count` decisions were stored."""
        self.written_total.inc(count)

    def dropped(self, reason: str, count: int) -> None:
        """`count` decisions were not stored, for `reason`."""
        self.dropped_total.labels(bounded(reason, frozenset(self.REASONS))).inc(count)


class Metrics:
    """Every metric the proxy exposes on /metrics."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        # `serve --workers N` (rsafe_proxy.workers) sets it for every worker: prometheus_client then keeps each
        # figure in a file of that directory, and a scrape of any worker adds up all of them
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.requests = Counter(
            "rsafe_requests", "HTTP requests answered", ["tenant", "route", "status"], registry=registry
        )
        # multiprocess_mode: how the workers' values add up (ignored by a single process)
        self.requests_in_flight = Gauge(
            "rsafe_requests_in_flight", "Requests being served", registry=registry, multiprocess_mode="livesum"
        )
        self.streams_in_flight = Gauge(
            "rsafe_streams_in_flight", "Event streams being sent", registry=registry, multiprocess_mode="livesum"
        )
        self.errors = Counter("rsafe_errors", "Errors, by kind (the error code)", ["kind"], registry=registry)
        self.decisions = Counter(
            "rsafe_decisions",
            "Screening decisions (outcome: the action)",
            ["tenant", "side", "outcome"],
            registry=registry,
        )
        self.verdicts = Counter(
            "rsafe_verdicts",
            "Screening decisions with their verdict and category (the first the verdict names, or none)",
            ["tenant", "side", "verdict", "action", "category"],
            registry=registry,
        )
        self.guard_seconds = Histogram(
            "rsafe_guard_seconds",
            "Time one screen waited on the guard (cache hits excluded)",
            ["engine", "side"],
            registry=registry,
            buckets=_LATENCY,
        )
        self.guard_tokens = Counter(
            "rsafe_guard_tokens",
            "Guard model tokens (type: input, output, cached input)",
            ["engine", "side", "type"],
            registry=registry,
        )
        self.upstream_seconds = Histogram(
            "rsafe_upstream_seconds",
            "Upstream call latency, request sent to answer read (streams: to their end)",
            ["operation", "status"],
            registry=registry,
            buckets=_LATENCY,
        )
        self.overhead_seconds = Histogram(
            "rsafe_overhead_seconds",
            "The proxy's own time per request: waiting on the guard, the upstream and the client excluded",
            ["route"],
            registry=registry,
            buckets=_OVERHEAD,
        )
        self.cache_hits = Counter(
            "rsafe_verdict_cache_hits", "Verdicts served from the cache", ["side"], registry=registry
        )
        self.cache_misses = Counter(
            "rsafe_verdict_cache_misses", "Verdicts the guard was asked for", ["side"], registry=registry
        )
        self.reloads = Counter(
            "rsafe_reloads", "Policy and tenant reloads, by result (ok, error)", ["result"], registry=registry
        )
        self.policy_reload_errors = Counter(
            "rsafe_policy_reload_errors", "Policy edits rejected as invalid", registry=registry
        )
        self.guard_ready = Gauge(
            "rsafe_guard_ready",
            "1 when the guard can serve verdicts (probed in the background; with several workers, in every one)",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.audit = AuditCounters(registry)

    def reload_failed(self, count: int = 1) -> None:
        """`count` rejected edits."""
        self.reloads.labels("error").inc(count)
        self.policy_reload_errors.inc(count)

    def render(self) -> bytes:
        """The text exposition format: this process's figures, or every worker's in multiprocess mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)  # type: ignore[no-untyped-call]  # untyped upstream
        return generate_latest(registry)
