"""The decisions page's filters: read from the query string into a DecisionQuery, with a plain-words reason for
each value that cannot be used; and written back, for the paging links. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode

from rsafe_proxy.audit.record import DecisionQuery

PAGE_SIZE = 50
MAX_PAGE = 100_000
VERDICTS = ("safe", "unsafe", "unknown")
ACTIONS = ("allow", "flag", "rewrite", "block", "guard_error_block", "guard_error_allow")
SIDES = ("input", "output")
# the filters a page's query string may carry, in the order the form shows them
FIELDS = ("tenant", "verdict", "action", "side", "category", "policy_version", "since", "until")
_MAX_TEXT = 200


@dataclass(frozen=True)
class Filters:
    """The filters as given (for the form and the paging links), the query they make, and what was wrong."""

    given: Mapping[str, str]
    query: DecisionQuery
    page: int = 1
    problems: Mapping[str, str] = field(default_factory=dict)

    def link(self, page: int) -> str:
        """The query string of `page` with the same filters."""
        pairs = [(name, value) for name, value in self.given.items() if value]
        return urlencode([*pairs, ("page", str(page))])


def parse_time(text: str) -> float:
    """Unix seconds from `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS]` (UTC unless an offset is given) or ISO 8601
    with an offset; ValueError otherwise."""
    moment = datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def show_time(seconds: float) -> str:
    """A Unix time as the console shows it: UTC, to the second."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_filters(params: Mapping[str, str], tenants: tuple[str, ...] | None) -> Filters:
    """The filters in `params`; `tenants` restricts the query to those tenants (a tenant's console key)."""
    given = {name: params.get(name, "").strip() for name in FIELDS}
    problems: dict[str, str] = {}
    for name, value in given.items():
        if len(value) > _MAX_TEXT:
            problems[name] = f"at most {_MAX_TEXT} characters"
    for name, allowed in (("verdict", VERDICTS), ("action", ACTIONS), ("side", SIDES)):
        if given[name] and given[name] not in allowed:
            problems[name] = "one of " + ", ".join(allowed)
    times: dict[str, float | None] = {"since": None, "until": None}
    for name in times:
        if given[name] and name not in problems:
            try:
                moment = parse_time(given[name])
                whole_day = name == "until" and len(given[name]) == len("2025-06-30")
                times[name] = moment + 86_400 if whole_day else moment  # a day named as 'until' is included
            except ValueError:
                problems[name] = "a date like 2025-06-30 or 2025-06-30T14:05 (UTC), or ISO 8601 with an offset"
    since, until = times["since"], times["until"]
    if since is not None and until is not None and since > until:
        problems["until"] = "must not be before 'since'"
    page = 1
    if raw_page := params.get("page", "").strip():
        if not (raw_page.isascii() and raw_page.isdigit()) or not 1 <= int(raw_page) <= MAX_PAGE:
            problems["page"] = f"a whole number from 1 to {MAX_PAGE}"
        else:
            page = int(raw_page)

    def text(name: str) -> str | None:
        return None if name in problems else (given[name] or None)

    query = DecisionQuery(
        tenant=text("tenant"),
        verdict=text("verdict"),
        action=text("action"),
        side=text("side"),
        category=text("category"),
        policy_version=text("policy_version"),
        since=since,
        until=until,
        limit=PAGE_SIZE,
        offset=(page - 1) * PAGE_SIZE,
        tenants=tenants,
    )
    return Filters(given, query, page, problems)
