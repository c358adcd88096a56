"""The decision store in PostgreSQL, for a fleet: every proxy writes to one database (psycopg 3, the optional
`postgres` extra). Same schema and queries as SQLite (sql.py); migrations are serialised across processes by a
transaction-scoped advisory lock. A connection found closed (the server restarted) is opened again on next use."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from rsafe_proxy.audit.sql import Cursor, SqlStore

if TYPE_CHECKING:
    import psycopg

# pg_advisory_xact_lock's key for "migrating the decision store" (any fixed number; "RSAF" in ASCII)
_MIGRATION_LOCK = 0x52534146
_WRITE_LOCK = _MIGRATION_LOCK + 1  # "writing decisions": a trace's next free seq is read, then taken


def redacted(url: str) -> str:
    """`url` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection: psycopg.Connection[Any] | None = None


class PostgresStore(SqlStore):
    """The decision store in the PostgreSQL database at `url` (`postgresql://user:pass@host:port/db`)."""

    placeholder = "%s"

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        super().__init__()
        try:
            import psycopg  # noqa: F401  # only checked here: a missing extra is reported when configured
        except ImportError as error:
            raise ImportError(
                "audit.url is a PostgreSQL URL, but psycopg is not installed: pip install 'rsafe-proxy[postgres]'"
            ) from error
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._slots = {True: _Slot(), False: _Slot()}

    @property
    def location(self) -> str:
        """The URL, password hidden."""
        return redacted(self.url)

    def _connection(self, slot: _Slot) -> psycopg.Connection[Any]:
        import psycopg

        connection = slot.connection
        if connection is None or connection.closed or connection.broken:
            if connection is not None:
                connection.close()
            slot.connection = connection = psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout_s))
            )
        return connection

    @contextmanager
    def _transaction(self, writing: bool, migrating: bool = False) -> Iterator[Cursor]:
        slot = self._slots[writing]
        with slot.lock:
            connection = self._connection(slot)
            with connection.transaction(), connection.cursor() as cursor:
                if migrating:
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                yield cursor

    def _serialise_writes(self, cursor: Cursor) -> None:
        """Writers of the fleet take turns: two proxies storing one trace's requests must not pick the same seq."""
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))

    def close(self) -> None:
        """Close both connections (a later call opens them again)."""
        for slot in self._slots.values():
            with slot.lock:
                if slot.connection is not None:
                    slot.connection.close()
                    slot.connection = None
