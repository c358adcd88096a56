"""`rsafe-proxy eval`: the configured guard on labelled JSONL files, one table row per file."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from rsafe_proxy.datasets import Row, read_rows
from rsafe_proxy.evaluation import Metrics, compute_metrics, format_table
from rsafe_proxy.guard.screen import Screener, Verdict
from rsafe_proxy.policy.schema import Policy


def read_sample(path: Path, limit: int | None = None) -> list[Row]:
    """The rows of `path`; with `limit`, that many evenly spaced through the file (datasets are often sorted by
    label or category, so the first N would not do)."""
    rows = read_rows(path)
    if limit is not None and len(rows) > limit:
        rows = [rows[index * len(rows) // limit] for index in range(limit)]
    return rows


async def evaluate_file(
    screener: Screener, policy: Policy, rows: Sequence[Row], concurrency: int, name: str
) -> list[Verdict]:
    """Screen every row (input side for prompts, output side for responses), `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    progress = tqdm(total=len(rows), desc=name, unit="row", file=sys.stderr, leave=False)

    async def one(row: Row) -> Verdict:
        async with gate:
            verdict = await screener.screen(policy, row.side, row.prompt, row.response)
        progress.update(1)
        return verdict

    try:
        return list(await asyncio.gather(*(one(row) for row in rows)))
    finally:
        progress.close()


def metrics_of(rows: Sequence[Row], verdicts: Sequence[Verdict]) -> Metrics:
    """The evaluation metrics; cached verdicts do not count towards latency."""
    return compute_metrics(
        [row.label for row in rows],
        [verdict.label.value for verdict in verdicts],
        [verdict.seconds for verdict in verdicts if not verdict.cached] or None,
        [verdict.completion_tokens for verdict in verdicts] if any(v.completion_tokens for v in verdicts) else None,
    )


def write_predictions(path: Path, rows: Sequence[Row], verdicts: Sequence[Verdict], source: str) -> None:
    """Append one JSON line per row: gold, prediction, probability, reasoning, latency."""
    with path.open("a", encoding="utf-8") as file:
        for row, verdict in zip(rows, verdicts, strict=True):
            record = {
                "file": source,
                "id": row.id,
                "label": row.label,
                "prediction": verdict.label.value,
                "unsafe_probability": verdict.unsafe_probability,
                "seconds": round(verdict.seconds, 4),
                "completion_tokens": verdict.completion_tokens,
                "reasoning": verdict.reasoning,
                "error": verdict.error,
            }
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `rsafe-proxy eval`."""
    parser.add_argument("--data", action="append", required=True, type=Path, help="normalized JSONL (repeatable)")
    parser.add_argument("--limit", type=int, help="N rows of each file, evenly spaced through it")
    parser.add_argument("--policy", help="a policy file (default: the first tenant's policy)")
    parser.add_argument("--concurrency", type=int, default=4, help="rows screened at once (default: %(default)s)")
    parser.add_argument("--predictions", type=Path, help="write predictions and reasoning to this JSONL file")
    parser.add_argument("--json", type=Path, help="write the metrics as JSON")


async def run_eval(screener: Screener, policy: Policy, args: argparse.Namespace) -> int:
    """Evaluate every --data file and print the table."""
    if args.predictions:
        args.predictions.write_text("", encoding="utf-8")
    results: list[tuple[str, Metrics]] = []
    for path in args.data:
        rows = read_sample(path, args.limit)
        if not rows:
            print(f"{path}: no rows", file=sys.stderr)
            continue
        verdicts = await evaluate_file(screener, policy, rows, max(1, args.concurrency), path.stem)
        results.append((path.stem, metrics_of(rows, verdicts)))
        if args.predictions:
            write_predictions(args.predictions, rows, verdicts, path.name)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps({name: m.as_dict() for name, m in results}, indent=2), encoding="utf-8")
    return 0
