"""The audit log: every screening decision, and every policy text that judged, in a database behind one small
interface (record.DecisionStore): SQLite by default (sqlite.py), PostgreSQL for a fleet (postgres.py). The proxy
writes it off the request path (writer.py) from its screen spans (spans.py); `rsafe-proxy decisions`
(command.py) and the console read it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from rsafe_proxy.audit.record import DecisionQuery, DecisionRecord, DecisionStore, PolicyVersion
from rsafe_proxy.config import AuditSettings

__all__ = [
    "DecisionQuery",
    "DecisionRecord",
    "DecisionStore",
    "PolicyVersion",
    "default_path",
    "open_store",
    "store_url",
]

DB_NAME = "decisions.db"


def default_path(env: Mapping[str, str] | None = None) -> Path:
    """The SQLite file used when `audit.url` is unset: in $RSAFE_STATE_DIR, else $XDG_STATE_HOME/rsafe-proxy,
    else ~/.local/state/rsafe-proxy. Per user, and the same wherever the proxy or the CLI is started."""
    env = os.environ if env is None else env
    if env.get("RSAFE_STATE_DIR"):
        return Path(env["RSAFE_STATE_DIR"]).expanduser() / DB_NAME
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]).expanduser() / "rsafe-proxy" / DB_NAME
    return Path.home() / ".local" / "state" / "rsafe-proxy" / DB_NAME


def is_postgres(url: str) -> bool:
    """True for a PostgreSQL URL."""
    return url.lower().startswith(("postgresql://", "postgres://"))


def store_url(settings: AuditSettings, base_dir: str | Path = ".", env: Mapping[str, str] | None = None) -> str:
    """Where the settings put the store: a PostgreSQL URL, or the SQLite file's absolute path."""
    url = settings.url
    if url is None:
        return str(default_path(env))
    if is_postgres(url):
        return url
    # sqlite:///relative.db and sqlite:////absolute.db, as SQLAlchemy writes them
    path = Path(url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url).expanduser()
    return str(path if path.is_absolute() else Path(base_dir).resolve() / path)


def open_store(
    settings: AuditSettings, base_dir: str | Path = ".", env: Mapping[str, str] | None = None
) -> DecisionStore:
    """The store the settings select. Nothing is connected yet: the first call connects (and migrates), so a
    store that is down cannot stop the proxy from starting."""
    url = store_url(settings, base_dir, env)
    if is_postgres(url):
        from rsafe_proxy.audit.postgres import PostgresStore

        return PostgresStore(url)
    from rsafe_proxy.audit.sqlite import SqliteStore

    return SqliteStore(url)
