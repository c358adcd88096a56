"""`rsafe-proxy decisions`: the audit log read from the command line, filtered, as a table (local times with
their zone) or one JSON object a line; `--follow` keeps printing decisions as they are written.

It reads only the `audit:` section of proxy.yaml, so it runs without the upstream's or the guard's variables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rsafe_proxy.arguments import at_least_one
from rsafe_proxy.audit import is_postgres, open_store, store_url
from rsafe_proxy.audit.record import DecisionQuery, DecisionRecord, DecisionStore
from rsafe_proxy.config import AuditSettings, load_settings

NO_MATCH = "no decisions match"
DEFAULT_LIMIT = 20
FOLLOW_EVERY_S = 1.0
# --follow asks again for this far back: a worker's batch may land after a later decision of another worker
FOLLOW_LAG_S = 30.0
_FOLLOW_PAGE = 1000
# what a terminal would act on (escape sequences, carriage returns, C1 controls, bidi overrides): the guard's
# reasoning may quote a prompt, so these are printed as escapes, never as themselves
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_ACTIONS = ("allow", "flag", "rewrite", "block", "guard_error_block", "guard_error_allow")
# (header, width): the last column (the policy) takes what it needs
_COLUMNS = (
    ("TIME", 25),
    ("TENANT", 12),
    ("SIDE", 6),
    ("VERDICT", 7),
    ("ACTION", 17),
    ("CATEGORIES", 12),
    ("SCORE", 5),
    ("DECISION ID", 36),
    ("POLICY", 0),
)


def moment(text: str) -> float:
    """A time given as an age back from now (`30m`, `2h`, `7d`, `1w`) or as an ISO 8601 time (`2025-06-01`,
    `2025-06-01T14:30`, `...+02:00`; no zone: local time), as Unix seconds."""
    age = _AGE.fullmatch(text.strip().lower())
    if age:
        return time.time() - float(age.group(1)) * _UNITS[age.group(2)]
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an age (30m, 2h, 7d) nor an ISO 8601 time (2025-06-01, 2025-06-01T14:30)"
        ) from None
    return (parsed.astimezone() if parsed.tzinfo is None else parsed).timestamp()


def add_decisions_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `rsafe-proxy decisions`."""
    parser.add_argument("--tenant", help="only this tenant's decisions")
    parser.add_argument("--verdict", choices=["safe", "unsafe", "unknown"], help="only this verdict")
    parser.add_argument("--action", choices=_ACTIONS, help="only this action")
    parser.add_argument("--side", choices=["input", "output"], help="only prompts (input) or answers (output)")
    parser.add_argument("--category", help="only decisions naming this category id (exact, e.g. U2)")
    parser.add_argument(
        "--policy-version", metavar="VERSION", help="only decisions under this policy version (or ID@VERSION)"
    )
    parser.add_argument("--since", type=moment, metavar="TIME", help="from this time: 2h, 7d or ISO 8601 (local)")
    parser.add_argument("--until", type=moment, metavar="TIME", help="before this time: 30m, 1d or ISO 8601")
    parser.add_argument("--id", dest="decision_id", metavar="DECISION_ID", help="the decisions of one request")
    parser.add_argument("--json", action="store_true", help="one JSON object a line, every field")
    parser.add_argument("--follow", action="store_true", help="keep printing decisions as they are written")
    parser.add_argument("--reasoning", action="store_true", help="print the guard's reasoning under each decision")
    parser.add_argument(
        "--last",
        "--limit",
        dest="limit",
        type=at_least_one,
        metavar="N",
        help=f"how many, the latest (default: {DEFAULT_LIMIT}; with --id, all)",
    )
    parser.add_argument("--url", help="the audit log to read: a SQLite file or postgresql:// URL (default: audit.url)")


def _query(args: argparse.Namespace, limit: int) -> DecisionQuery:
    version = args.policy_version.rpartition("@")[2] if args.policy_version else None
    return DecisionQuery(
        tenant=args.tenant,
        verdict=args.verdict,
        action=args.action,
        side=args.side,
        category=args.category,
        policy_version=version,
        since=args.since,
        until=args.until,
        decision_id=args.decision_id,
        limit=limit,
    )


def local_time(seconds: float) -> str:
    """`seconds` as local time with its UTC offset, to the second."""
    return datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def _printable(text: str) -> str:
    """`text` with what a terminal would act on written as `\\xNN` / `\\uNNNN`."""
    return _CONTROL.sub(lambda found: ascii(found.group())[1:-1], text)


def _line(cells: Sequence[str]) -> str:
    return "  ".join(
        _printable(cell).ljust(width) if width else _printable(cell)
        for cell, (_, width) in zip(cells, _COLUMNS, strict=True)
    )


def _table_row(record: DecisionRecord) -> str:
    score = "-" if record.score is None else f"{record.score:.2f}"
    return _line(
        [
            local_time(record.time),
            record.tenant,
            record.side,
            record.verdict,
            record.action,
            ",".join(record.categories) or "-",
            score,
            f"{record.decision_id}/{record.seq}",
            f"{record.policy_id}@{record.policy_version}",
        ]
    )


def _json_row(record: DecisionRecord) -> str:
    row: dict[str, Any] = dataclasses.asdict(record)
    row["categories"] = list(record.categories)
    row["local_time"] = datetime.fromtimestamp(record.time).astimezone().isoformat(timespec="milliseconds")
    return _CONTROL.sub(lambda found: f"\\u{ord(found.group()):04x}", json.dumps(row, ensure_ascii=False))


class _Printer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.json, self.reasoning = args.json, args.reasoning
        self.header_done = False

    def print(self, records: Iterable[DecisionRecord]) -> None:
        for record in records:
            if self.json:
                print(_json_row(record))
                continue
            if not self.header_done:
                print(_line([header for header, _ in _COLUMNS]).rstrip())
                self.header_done = True
            print(_table_row(record))
            if self.reasoning:
                reasoning = record.reasoning or "(none recorded: the policy does not capture reasoning)"
                lines = [_printable(line) for line in reasoning.strip().split("\n")]
                print("    reasoning: " + "\n               ".join(lines))
        sys.stdout.flush()


def _key(record: DecisionRecord) -> tuple[str, str, int]:
    return (record.decision_id, record.side, record.seq)


def _follow(store: DecisionStore, args: argparse.Namespace, printer: _Printer, shown: list[DecisionRecord]) -> None:
    seen = {_key(record): record.time for record in shown}
    newest = max((record.time for record in shown), default=time.time() - FOLLOW_LAG_S)
    while True:
        time.sleep(FOLLOW_EVERY_S)
        since = max(newest - FOLLOW_LAG_S, args.since or -1.0)
        fresh = [
            record
            for record in reversed(store.query(dataclasses.replace(_query(args, _FOLLOW_PAGE), since=since)))
            if _key(record) not in seen
        ]
        printer.print(fresh)
        for record in fresh:
            seen[_key(record)] = record.time
            newest = max(newest, record.time)
        seen = {key: at for key, at in seen.items() if at >= newest - 2 * FOLLOW_LAG_S}


def _store_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError, RuntimeError)
    try:
        import psycopg
    except ImportError:
        return errors
    return (*errors, psycopg.Error)


def run_decisions(args: argparse.Namespace) -> int:
    """Print the decisions that match; 0 also when none do, 2 when the audit log cannot be read."""
    if args.url:
        url = store_url(AuditSettings(url=args.url), Path.cwd())
    else:
        settings = load_settings(args.config, sections=("audit",))
        url = store_url(settings.audit, settings.base_dir)
    if not is_postgres(url) and not Path(url).exists() and not args.follow:
        print(f"{NO_MATCH} (no audit log yet at {url})", file=sys.stderr)
        return 0
    store = open_store(AuditSettings(url=url))
    printer = _Printer(args)
    try:
        limit = args.limit or (10_000 if args.decision_id else DEFAULT_LIMIT)
        # --follow prints what is written from now on: what the window already holds counts as seen, --last or not
        window = dataclasses.replace(_query(args, _FOLLOW_PAGE), since=time.time() - FOLLOW_LAG_S)
        known = store.query(window) if args.follow else []
        shown = list(reversed(store.query(_query(args, limit))))  # the latest, oldest first (as `tail`)
        if not shown and not args.follow:
            print(NO_MATCH, file=sys.stderr)
            return 0
        printer.print(shown)
        if args.follow:
            _follow(store, args, printer, [*known, *shown])
    except BrokenPipeError:  # before the store's errors: it is an OSError too
        # the reader (`| head`) has gone: stop quietly, and keep Python's exit flush from failing again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 0
    except _store_errors() as error:
        location = getattr(store, "location", url)
        print(f"rsafe-proxy: cannot read the audit log at {location}: {error}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0
