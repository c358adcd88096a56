"""Decisions written off the request path: a bounded queue, and a thread that writes it in batches.

A request only puts its decision in the queue (never waits): when the store is slow, failing or the queue full,
the decision is dropped, counted (`rsafe_audit_dropped_total`, by reason) and logged at most once every
`LOG_EVERY_S` seconds. The thread also applies retention (age, rows) every `prune_every_s`, and `close` writes
what is queued before the store is closed (bounded by a timeout: a hung store cannot hold up shutdown)."""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from rsafe_proxy.audit.record import DecisionRecord, DecisionStore, PolicyVersion

log = logging.getLogger("rsafe_proxy.audit")

LOG_EVERY_S = 60.0  # at most one warning a minute about dropped decisions


@dataclass(frozen=True)
class Retention:
    """How long and how many decisions the store keeps (None: no limit)."""

    max_age_s: float | None = None
    max_rows: int | None = None


class Counters(Protocol):
    """What the writer counts (the proxy's Prometheus counters: telemetry.metrics.AuditCounters)."""

    def written(self, count: int) -> None:
        """`count` decisions were stored."""

    def dropped(self, reason: str, count: int) -> None:
        """`count` decisions were not stored, for `reason` (queue_full, store_error, shutdown)."""


class _Uncounted:
    def written(self, count: int) -> None:
        pass

    def dropped(self, reason: str, count: int) -> None:
        pass


class AuditWriter:
    """Writes decisions to `store` from a thread of its own; `submit` never blocks."""

    def __init__(
        self,
        store: DecisionStore,
        *,
        counters: Counters | None = None,
        max_queue: int = 10_000,
        batch_size: int = 500,
        flush_every_s: float = 0.5,
        retention: Retention = Retention(),
        prune_every_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.counters: Counters = counters or _Uncounted()
        self.batch_size = batch_size
        self.flush_every_s = flush_every_s
        self.retention = retention
        self.prune_every_s = prune_every_s
        self.clock = clock
        self._queue: queue.Queue[DecisionRecord | None] = queue.Queue(maxsize=max_queue)  # None: wake up
        # policy texts are few and each one matters: kept apart from the decisions, never dropped for room
        self._policies: collections.deque[PolicyVersion] = collections.deque()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rsafe-audit-writer", daemon=True)
        self._last_warning = -LOG_EVERY_S
        self._unreported: dict[str, int] = {}
        self._warning_lock = threading.Lock()
        self.written = 0
        self.dropped = 0

    def start(self) -> AuditWriter:
        """Start the writing thread."""
        self._thread.start()
        return self

    def submit(self, record: DecisionRecord) -> None:
        """Queue one decision; dropped (and counted) if the queue is full or the writer is closed."""
        if self._stopping.is_set():
            self._drop("shutdown", 1)
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._drop("queue_full", 1)

    def submit_policy(self, version: PolicyVersion) -> None:
        """Queue a policy text to keep (written before the next batch of decisions)."""
        self._policies.append(version)

    def _drop(self, reason: str, count: int, error: BaseException | None = None) -> None:
        self.dropped += count
        self.counters.dropped(reason, count)
        with self._warning_lock:
            self._unreported[reason] = self._unreported.get(reason, 0) + count
            now = time.monotonic()
            if now - self._last_warning < LOG_EVERY_S:
                return
            self._last_warning, unreported, self._unreported = now, self._unreported, {}
        why = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(unreported.items()))
        detail = f": {type(error).__name__}: {error}" if error is not None else ""
        log.warning("audit log: decisions not written (%s)%s; traffic is not affected", why, detail)

    def _batch(self, wait_s: float) -> list[DecisionRecord]:
        batch: list[DecisionRecord] = []
        try:
            item = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
            while True:
                if item is None:  # close's wake-up call
                    self._queue.task_done()
                else:
                    batch.append(item)
                if len(batch) >= self.batch_size:
                    break
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        return batch

    def _write_policies(self) -> None:
        while self._policies:
            version = self._policies[0]
            try:
                self.store.record_policy(version)
            except Exception as error:  # kept queued: tried again with the next batch
                log.warning("audit log: policy %s@%s not written yet: %s", version.policy_id, version.version, error)
                return
            self._policies.popleft()

    def _write(self, batch: list[DecisionRecord]) -> None:
        self._write_policies()
        if not batch:
            return
        try:
            self.store.write(batch)
        except Exception as error:  # the store is down or refuses: the batch is dropped, traffic goes on
            self._drop("store_error", len(batch), error)
        else:
            self.written += len(batch)
            self.counters.written(len(batch))
        finally:
            for _ in batch:
                self._queue.task_done()

    def _prune(self) -> None:
        retention = self.retention
        if retention.max_age_s is None and retention.max_rows is None:
            return
        try:
            pruned = self.store.prune(max_age_s=retention.max_age_s, max_rows=retention.max_rows, now=self.clock())
        except Exception as error:
            log.warning("audit log: retention not applied: %s", error)
            return
        if pruned:
            log.info("audit log: %d decisions past retention removed", pruned)

    def _run(self) -> None:
        next_prune = time.monotonic()
        while not self._stopping.is_set():
            # a batch every flush_every_s, not a wake-up per decision: waking this thread for each one (a thread
            # switch, a commit of one row) cost a screened request ~10% of the proxy's CPU (benchmarks/README.md)
            self._stopping.wait(self.flush_every_s)
            while (batch := self._batch(0)) or self._policies:
                self._write(batch)
                if not batch:
                    break
            if time.monotonic() >= next_prune:
                self._prune()
                next_prune = time.monotonic() + self.prune_every_s
        while batch := self._batch(0):  # closing: what was queued is written
            self._write(batch)
        self._write_policies()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every decision queued so far is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, stop the thread, close the store. Decisions still queued after `timeout_s`
        (a hung store) are counted as dropped."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # a full queue wakes the thread anyway
            self._queue.put_nowait(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            left = self._queue.qsize()
            if left:
                self._drop("shutdown", left)
            log.warning("audit log: the store did not finish writing within %.0f s", timeout_s)
            return  # the thread still uses the store: it is left to the process's exit
        self.store.close()
