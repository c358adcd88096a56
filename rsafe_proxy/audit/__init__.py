"""The audit log: every screening decision, and every policy text that judged, in a database behind one small
interface (record.DecisionStore): SQLite by default (sqlite.py), PostgreSQL for a fleet (postgres.py). The proxy
writes it off the request path (writer.py) from its screen spans (spans.py); `rsafe-proxy decisions`
(command.py) and the console read it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from rsafe_proxy.audit.record import DecisionQuery, DecisionRecord, DecisionStore, PolicyVersion
from rsafe_proxy.config import AuditSettings
from rsafe_proxy.statedir import state_dir

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
    return state_dir(env) / DB_NAME


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
