"""The decision store in one SQLite file: the default, for one machine (one or several worker processes).

WAL lets readers (the console, `rsafe-proxy decisions`) read while a worker writes; a write takes the file's lock
when its transaction begins (BEGIN IMMEDIATE), and a writer that finds it taken waits up to the busy timeout,
so several processes can write one file. The file is created readable by its owner only: it may hold the guard's
reasoning."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rsafe_proxy.audit.sql import Cursor, SqlStore


class _Slot:
    """One connection, opened on first use, and the lock that gives it to one thread at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection: sqlite3.Connection | None = None


class SqliteStore(SqlStore):
    """The decision store in the SQLite file at `path` (its directory is made if missing)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        super().__init__()
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        # one connection writes and one reads, so that a query never waits behind the writer's batch
        self._slots = {True: _Slot(), False: _Slot()}

    @property
    def location(self) -> str:
        """The file's path."""
        return str(self.path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        # isolation_level None: transactions are begun and ended here, explicitly
        connection = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint; WAL keeps it consistent
            connection.execute("PRAGMA foreign_keys = ON")  # a pruned decision takes its categories with it
        except BaseException:
            connection.close()
            raise
        return connection

    @contextmanager
    def _transaction(self, writing: bool, migrating: bool = False) -> Iterator[Cursor]:
        slot = self._slots[writing]
        with slot.lock:
            if slot.connection is None:
                slot.connection = self._connect()
            connection = slot.connection
            cursor = connection.cursor()
            try:
                # IMMEDIATE: the write lock is taken (or waited for) now, never upgraded mid-way, which could
                # fail at once with "database is locked" whatever the busy timeout
                cursor.execute("BEGIN IMMEDIATE" if writing else "BEGIN")
                yield cursor
                cursor.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:  # a failed COMMIT too: the connection must be usable again
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("ROLLBACK")
                raise
            finally:
                cursor.close()

    def _serialise_writes(self, cursor: Cursor) -> None:
        """Nothing to do: a writing transaction begins IMMEDIATE, holding the file's write lock."""

    def close(self) -> None:
        """Close both connections (a later call opens them again)."""
        for slot in self._slots.values():
            with slot.lock:
                if slot.connection is not None:
                    slot.connection.close()
                    slot.connection = None
