"""The proxy's log: plain text or one JSON object a line (`--log-format`), and one line per decision that blocks,
rewrites or flags (tenant, decision id, side, categories, action; never the content).

The decision lines come from the spans the pipeline already records (`DecisionLog` is a span processor), so
every decision that reaches telemetry reaches the log, with the same decision id the client receives in
`x-rsafe-decision-id`."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import format_trace_id

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

DECISION_LOGGER = "rsafe_proxy.decisions"

# Actions that change or mark what passes; `allow` (and an error allowed through, which the spans and metrics
# record) would make one line per request.
_LOGGED_ACTIONS = frozenset({"block", "rewrite", "flag", "guard_error_block"})

# LogRecord attributes every record has: anything else was passed in `extra` and belongs in the JSON object.
# (uvicorn adds `color_message`, its message with terminal colours.)
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, and the record's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({key: value for key, value in record.__dict__.items() if key not in _STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _ProxyHandler(logging.StreamHandler):  # type: ignore[type-arg]  # the stream's type is not needed
    """The handler `configure` installs (told apart so that a second call replaces it, and only it)."""


class _WorkerTag(logging.Filter):
    """Names the worker process on each record (`serve --workers N`): `worker` and `pid` fields in JSON."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker, record.pid = self.worker, record.process
        return True


def configure(log_format: LogFormat = "text", level: str = "info", worker: int | None = None) -> None:
    """Send every logger (uvicorn's included: serve it with `log_config=None`) to stderr in `log_format`.
    `worker`: the number of this worker process under `serve --workers N`, named with its pid on every line."""
    handler = _ProxyHandler(sys.stderr)
    if worker is not None:
        handler.addFilter(_WorkerTag(worker))
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = "" if worker is None else " [worker %(worker)d pid %(process)d]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in [existing for existing in root.handlers if isinstance(existing, _ProxyHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


class DecisionLog(SpanProcessor):
    """Logs each screening decision that blocks, rewrites or flags, as its `rsafe.screen` span ends.

    Only attributes are read (tenant, side, verdict, categories, action, policy); the content and the reasoning
    never reach the log."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(DECISION_LOGGER)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing to do until the decision is known."""

    def on_end(self, span: ReadableSpan) -> None:
        """Log the span's decision if it is one that blocks, rewrites or flags."""
        attributes = span.attributes or {}
        action = attributes.get("rsafe.action")
        if not isinstance(action, str) or action not in _LOGGED_ACTIONS:
            return
        context = span.get_span_context()
        named = attributes.get("rsafe.categories")
        categories = [str(category) for category in named] if isinstance(named, list | tuple) else []
        decision: dict[str, Any] = {
            "tenant": attributes.get("rsafe.tenant"),
            "decision_id": format_trace_id(context.trace_id) if context is not None else None,
            "side": attributes.get("rsafe.side"),
            "action": action,
            "verdict": attributes.get("rsafe.verdict"),
            "categories": categories,
            "policy": f"{attributes.get('rsafe.policy.id')}@{attributes.get('rsafe.policy.version')}",
        }
        self.logger.info(
            "decision %s: %s %s, categories %s, tenant %s, policy %s",
            decision["decision_id"],
            action,
            decision["side"],
            ",".join(categories) or "-",
            decision["tenant"],
            decision["policy"],
            extra={"decision": decision},
        )

    def shutdown(self) -> None:
        """Nothing held."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing buffered: lines are written as spans end."""
        return True
