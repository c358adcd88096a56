"""`rsafe-proxy eval`: the configured guard on labelled JSONL files, one table row per file."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from rsafe_proxy.datasets import Row, read_rows
from rsafe_proxy.eval_options import EvalOptions
from rsafe_proxy.evaluation import Metrics, compute_metrics, format_table
from rsafe_proxy.guard.engine import GuardEngine, GuardEngineError
from rsafe_proxy.guard.screen import Screener, Verdict
from rsafe_proxy.policy.schema import Policy

Dataset = tuple[Path, list[Row]]  # a --data file and the rows of it that are evaluated


def read_sample(path: Path, limit: int | None = None) -> list[Row]:
    """The rows of `path`; with `limit`, that many evenly spaced through the file (datasets are often sorted by
    label or category, so the first N would not do)."""
    rows = read_rows(path)
    if limit is not None and len(rows) > limit:
        rows = [rows[index * len(rows) // limit] for index in range(limit)]
    return rows


def read_datasets(options: EvalOptions) -> list[Dataset]:
    """Every --data file read and checked before anything runs (a bad line is a ValueError naming it, not a
    failure after the model loaded and the first files were judged; the options already hold that each is a
    file)."""
    return [(path, read_sample(path, options.limit)) for path in options.data]


async def start_engine(engine: GuardEngine, description: str) -> float:
    """Load the guard model before the first row, so that its load counts against no row's timeout or latency;
    say so on stderr, with how long it took. Returns the seconds the load took (0 for a served guard); a model
    that cannot load is a ValueError (the command's exit 2)."""
    if not engine.info.loads_model:
        print(f"guard: {description} (no model to load first)", file=sys.stderr, flush=True)
        return 0.0
    print(f"loading the guard model: {description} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        await engine.start()
    except GuardEngineError as error:
        raise ValueError(f"the guard could not start: {error}") from error
    seconds = time.perf_counter() - started
    print(f"guard model loaded in {seconds:.1f} s (not counted in any row's latency)", file=sys.stderr, flush=True)
    return seconds


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
    """The evaluation metrics; cached verdicts do not count towards latency. In score mode the verdicts'
    P(unsafe) give the AUROC and the best-threshold F1."""
    return compute_metrics(
        [row.label for row in rows],
        [verdict.label.value for verdict in verdicts],
        [verdict.seconds for verdict in verdicts if not verdict.cached] or None,
        [verdict.completion_tokens for verdict in verdicts] if any(v.completion_tokens for v in verdicts) else None,
        [verdict.unsafe_probability for verdict in verdicts],
    )


def latency_note(concurrency: int) -> str:
    """What the latency columns measure, printed under the table."""
    return (
        f"lat p50/p95 s/row: seconds from a row's screen to its verdict, {concurrency} rows screened at once "
        "(an engine that batches judges them together, so a row's time includes its batch-mates'); the model's "
        "load and cached verdicts are not counted."
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


async def run_eval(screener: Screener, policy: Policy, datasets: Sequence[Dataset], options: EvalOptions) -> int:
    """Evaluate every dataset (read by read_datasets; the engine started by start_engine) and print the table."""
    if options.predictions:
        options.predictions.write_text("", encoding="utf-8")
    results: list[tuple[str, Metrics]] = []
    for path, rows in datasets:
        if not rows:
            print(f"{path}: no rows", file=sys.stderr)
            continue
        verdicts = await evaluate_file(screener, policy, rows, options.concurrency, path.stem)
        results.append((path.stem, metrics_of(rows, verdicts)))
        if options.predictions:
            write_predictions(options.predictions, rows, verdicts, path.name)
    print(format_table(results))
    if any(metrics.latency_p50_s is not None for _, metrics in results):
        print(latency_note(options.concurrency))
    if options.json:
        options.json.write_text(json.dumps({name: m.as_dict() for name, m in results}, indent=2), encoding="utf-8")
    return 0
