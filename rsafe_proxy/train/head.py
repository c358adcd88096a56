"""`rsafe-proxy train-head`: train the embedded guard's verdict head (guard/head.py) on labelled rows.

Phases, each a function: choose the rows (`select`: per file at most a limit, label-balanced, and a validation
split by a hash of each row id), compute their hidden states once (features.py), fit a class-balanced
logistic regression (`fit`, full-batch L-BFGS in torch), choose a threshold per side on the validation split
(`thresholds`), report every set (AUROC, F1, FPR, calibration) and write the head beside the adapter.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsafe_proxy.datasets import Row, read_rows
from rsafe_proxy.evaluation import compute_metrics, roc_auc
from rsafe_proxy.guard.cache import TTLCache
from rsafe_proxy.guard.embedded import adapter_folder, cache_root, model_path
from rsafe_proxy.guard.engines.transformers import TransformersEngine
from rsafe_proxy.guard.head import HeadInfo, save_head
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.guard.screen import Screener, ScreenSettings
from rsafe_proxy.policy.loading import load_policy, packaged_policy_path
from rsafe_proxy.train.data import is_held_out
from rsafe_proxy.train.features import FeatureCache, Rendered, compute, matrix, render_rows
from rsafe_proxy.train.fingerprint import folder_digest

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Source:
    """One data file and how many of its rows to use (None: all)."""

    path: Path
    limit: int | None

    @classmethod
    def parse(cls, text: str) -> Source:
        """`PATH` or `PATH:LIMIT`."""
        path, _, limit = text.rpartition(":")
        return cls(Path(path), int(limit)) if path and limit.isdigit() else cls(Path(text), None)


@dataclass(frozen=True)
class HeadOptions:
    """Everything one training run depends on, parsed once."""

    data: tuple[Source, ...]
    evaluate: tuple[Source, ...]
    out: Path
    template: str = "rsafe-compact"
    layers: tuple[int, ...] = (6, 9, 12, 15, 18)
    validation: float = 0.15
    max_chars: int = 800
    l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2)  # tried in turn; the best validation AUROC is kept
    target_fpr: tuple[float, float] = (0.07, 0.10)  # input, output: the most false positives on validation
    batch: int = 8
    threads: int | None = None
    seed: int = 0
    cache: Path | None = None
    model: str = "embedded"
    adapter: str | None = "auto"
    policies: tuple[Path, ...] = ()  # besides the packaged default: each renders `augment` training rows again
    augment: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HeadOptions:
        """The options of a parsed command line."""
        return cls(
            data=tuple(Source.parse(text) for text in args.data),
            evaluate=tuple(Source.parse(text) for text in args.eval or []),
            out=Path(args.out),
            template=args.template,
            layers=tuple(int(layer) for layer in args.layers.split(",")),
            validation=args.validation,
            max_chars=args.max_chars,
            l2=tuple(float(value) for value in args.l2.split(",")),
            target_fpr=_pair(args.target_fpr),
            batch=args.batch,
            threads=args.threads,
            seed=args.seed,
            cache=Path(args.cache) if args.cache else None,
            model=args.model,
            adapter=None if args.adapter == "none" else args.adapter,
            policies=tuple(Path(path) for path in args.policy or []),
            augment=args.augment,
        )


def _pair(text: str) -> tuple[float, float]:
    """`A` or `A,B` as (A, A) or (A, B), each a rate in [0, 1]."""
    values = [float(value) for value in text.split(",")]
    if len(values) not in (1, 2) or not all(0 <= value <= 1 for value in values):
        raise ValueError(f"--target-fpr takes one or two rates between 0 and 1, not {text!r}")
    return (values[0], values[-1])


@dataclass(frozen=True)
class Split:
    """The rows of one run: trained on, validated on (thresholds), and only reported (unseen sets)."""

    train: list[Row]
    validation: list[Row]
    unseen: list[Row]


def _limited(rows: list[Row], limit: int | None, seed: int) -> list[Row]:
    """At most `limit` rows, as close to half of each label as the file allows, in file order."""
    if limit is None or len(rows) <= limit:
        return rows
    generator = random.Random(f"{seed}:{rows[0].origin}")
    by_label = {label: [row for row in rows if row.label == label] for label in ("safe", "unsafe")}
    share = {label: min(len(chosen), limit // 2) for label, chosen in by_label.items()}
    spare = limit - sum(share.values())
    for label in share:  # the other label's unused half goes to this one
        extra = min(spare, len(by_label[label]) - share[label])
        share[label] += extra
        spare -= extra
    kept = {id(row) for label, chosen in by_label.items() for row in generator.sample(chosen, share[label])}
    return [row for row in rows if id(row) in kept]


def select(options: HeadOptions) -> Split:
    """Read and cap every file; split the training files' rows into train and validation by id hash."""
    train: list[Row] = []
    validation: list[Row] = []
    for source in options.data:
        for row in _limited(read_rows(source.path), source.limit, options.seed):
            (validation if is_held_out(f"head:{row.id}", options.validation) else train).append(row)
    unseen = [
        row for source in options.evaluate for row in _limited(read_rows(source.path), source.limit, options.seed)
    ]
    return Split(train, validation, unseen)


def fit(features: np.ndarray, labels: np.ndarray, l2: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """A class-balanced, L2-penalised logistic regression on standardised features: (weight, bias, mean, scale)."""
    import numpy as np
    import torch

    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-4
    x = torch.tensor((features - mean) / scale, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    positive = float(y.mean())
    weights = torch.where(y > 0, 0.5 / positive, 0.5 / (1 - positive))
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        logits = x @ weight + bias
        value = (weights * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()
        value = value + l2 * (weight**2).sum()
        value.backward()  # type: ignore[no-untyped-call]
        return value

    optimiser.step(loss)  # type: ignore[no-untyped-call]
    return weight.detach().numpy(), float(bias.item()), mean.astype(np.float32), scale.astype(np.float32)


def predict(features: np.ndarray, weight: np.ndarray, bias: float, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """P(unsafe) of each row."""
    import numpy as np

    logits = ((features - mean) / scale) @ weight + bias
    return np.asarray(1 / (1 + np.exp(-logits)))


def _f1(labels: Sequence[int], scores: Sequence[float], threshold: float) -> tuple[float, float, float, float]:
    """(F1, precision, recall, FPR) of `scores >= threshold`."""
    tp = sum(1 for y, s in zip(labels, scores, strict=True) if y and s >= threshold)
    fp = sum(1 for y, s in zip(labels, scores, strict=True) if not y and s >= threshold)
    fn = sum(1 for y, s in zip(labels, scores, strict=True) if y and s < threshold)
    negatives = sum(1 for y in labels if not y)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return f1, precision, recall, fp / negatives if negatives else 0.0


def choose_threshold(labels: Sequence[int], scores: Sequence[float], target_fpr: float) -> float:
    """The threshold with the best F1 among those whose false-positive rate is at most `target_fpr` (the best F1
    overall when none is); thresholds are kept strictly inside (0, 1)."""
    candidates = sorted({min(max(round(s, 4), 0.001), 0.999) for s in scores} | {0.5})
    scored = [(threshold, *_f1(labels, scores, threshold)) for threshold in candidates]
    within = [entry for entry in scored if entry[4] <= target_fpr] or scored
    return max(within, key=lambda entry: (entry[1], entry[0]))[0]


def calibration_error(labels: Sequence[int], scores: Sequence[float], bins: int = 10) -> float:
    """Expected calibration error: the mean gap between predicted P(unsafe) and the observed rate, per bin."""
    binned: dict[int, list[tuple[int, float]]] = {}
    for label, score in zip(labels, scores, strict=True):
        binned.setdefault(min(int(score * bins), bins - 1), []).append((label, score))
    gap = 0.0
    for chosen in binned.values():
        observed = sum(label for label, _ in chosen) / len(chosen)
        predicted = sum(score for _, score in chosen) / len(chosen)
        gap += len(chosen) / len(labels) * abs(predicted - observed)
    return gap


def report(name: str, rows: Sequence[Row], scores: Sequence[float], thresholds: dict[str, float]) -> dict[str, Any]:
    """One set's figures at the per-side thresholds."""
    gold = [row.label for row in rows]
    decided = ["unsafe" if s >= thresholds[row.side.value] else "safe" for row, s in zip(rows, scores, strict=True)]
    metrics = compute_metrics(gold, decided, unsafe_scores=list(scores))
    return {
        "set": name,
        "n": metrics.n,
        "unsafe": gold.count("unsafe"),
        "f1": metrics.f1,
        "precision": metrics.precision,
        "recall": metrics.recall,
        "fpr": metrics.false_positive_rate,
        "auroc": metrics.auroc,
        "ece": calibration_error([label == "unsafe" for label in gold], list(scores)),
    }


def _table(entries: Sequence[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    columns = ["set", "n", "unsafe", "f1", "precision", "recall", "fpr", "auroc", "ece"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(entry[column]) for column in columns) + " |" for entry in entries]
    return "\n".join(lines)


def run(options: HeadOptions) -> dict[str, Any]:
    """Train, choose thresholds, report and write the head; the summary as a dict."""
    import numpy as np

    split = select(options)
    engine = TransformersEngine(model=options.model, adapter=options.adapter, mode="score", threads=options.threads)
    runner = engine._load()  # the engine's own runner, on this thread
    screener = Screener(engine, ScreenSettings(mode="score", template=options.template), TTLCache(1, 1.0))
    policy = load_policy(packaged_policy_path())
    cache = FeatureCache(options.cache or cache_root() / "head-features", producer(options))
    every = {
        name: render_rows(screener, policy, rows, options.max_chars)
        for name, rows in (("train", split.train), ("validation", split.validation), ("unseen", split.unseen))
    }
    every["train"] += _augmented(screener, split.train, options)
    compute(
        runner.features,
        [item for items in every.values() for item in items],
        cache,
        options.layers,
        batch=options.batch,
    )
    features = {name: matrix(items, cache) if items else np.zeros((0, 1)) for name, items in every.items()}
    labels = {name: np.array([item.row.label == "unsafe" for item in items], float) for name, items in every.items()}
    weight, bias, mean, scale = _best_fit(options.l2, features, labels, split.validation)
    scores = {name: predict(x, weight, bias, mean, scale).tolist() if len(x) else [] for name, x in features.items()}
    thresholds = {}
    for side in Side:
        chosen = [(row, s) for row, s in zip(split.validation, scores["validation"], strict=True) if row.side is side]
        gold = [1 if row.label == "unsafe" else 0 for row, _ in chosen]
        thresholds[side.value] = (
            choose_threshold(gold, [s for _, s in chosen], options.target_fpr[side is Side.OUTPUT]) if chosen else 0.5
        )
    hidden = features["train"].shape[1] // len(options.layers)
    info = HeadInfo(options.layers, thresholds, options.template, hidden)
    save_head(options.out, info, weight, bias, mean, scale)
    entries = _reports(split, every, scores, thresholds)
    summary = {
        "options": _described(options),
        "thresholds": thresholds,
        "rows": {k: len(v) for k, v in every.items()},
        "reports": entries,
    }
    (options.out / "head-report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(_table(entries))
    return summary


def producer(options: HeadOptions) -> dict[str, Any]:
    """What the features depend on besides the rendered prompt: the model's and the adapter's files (by content,
    so a model or adapter retrained in place is read afresh) and the layers read."""
    adapter = adapter_folder(options.model, options.adapter)
    return {
        "model": folder_digest(model_path(options.model)),
        "adapter": folder_digest(adapter) if adapter is not None else None,
        "layers": list(options.layers),
        "version": 2,
    }


def _augmented(screener: Screener, rows: list[Row], options: HeadOptions) -> list[Rendered]:
    """`options.augment` training rows (a seeded sample, the same for every policy) rendered again under each of
    `options.policies`, with their labels: the head learns that a policy's wording alone does not make content
    unsafe (trained under one policy only, every other category list shifted its scores up)."""
    if not options.policies or options.augment <= 0:
        return []
    chosen = random.Random(options.seed).sample(rows, min(options.augment, len(rows)))
    rendered: list[Rendered] = []
    for path in options.policies:
        rendered += render_rows(screener, load_policy(path), chosen, options.max_chars)
    return rendered


def _best_fit(
    penalties: Sequence[float], features: dict[str, np.ndarray], labels: dict[str, np.ndarray], validation: list[Row]
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """The fit, among one per L2 penalty, whose mean validation AUROC over the sides is highest."""
    best: tuple[float, tuple[np.ndarray, float, np.ndarray, np.ndarray]] | None = None
    for penalty in penalties:
        fitted = fit(features["train"], labels["train"], penalty)
        scores = predict(features["validation"], *fitted).tolist() if validation else []
        areas = []
        for side in Side:
            chosen = [(row.label, s) for row, s in zip(validation, scores, strict=True) if row.side is side]
            area = roc_auc([label for label, _ in chosen], [s for _, s in chosen]) if chosen else None
            if area is not None:
                areas.append(area)
        quality = sum(areas) / len(areas) if areas else 0.0
        print(f"l2 {penalty:g}: validation AUROC {quality:.4f}", file=sys.stderr, flush=True)
        if best is None or quality > best[0]:
            best = (quality, fitted)
    assert best is not None, "no L2 penalty given"
    return best[1]


def _reports(
    split: Split, every: dict[str, list[Rendered]], scores: dict[str, list[float]], thresholds: dict[str, float]
) -> list[dict[str, Any]]:
    entries = []
    for name in ("validation", "unseen"):
        rows = split.validation if name == "validation" else split.unseen
        for side in Side:
            chosen = [(row, s) for row, s in zip(rows, scores[name], strict=True) if row.side is side]
            if chosen and name == "validation":
                entries.append(
                    report(f"validation ({side.value})", [r for r, _ in chosen], [s for _, s in chosen], thresholds)
                )
        for origin in dict.fromkeys(row.origin for row in rows):
            chosen = [(row, s) for row, s in zip(rows, scores[name], strict=True) if row.origin == origin]
            entries.append(report(f"{name}: {origin}", [r for r, _ in chosen], [s for _, s in chosen], thresholds))
    return entries


def _described(options: HeadOptions) -> dict[str, Any]:
    """The options as the report keeps them: data files by name (portable), no local folders."""
    plain: dict[str, Any] = _plain(asdict(options))
    for key in ("data", "evaluate"):
        plain[key] = [f"{Path(source['path']).name}:{source['limit'] or 'all'}" for source in plain[key]]
    for key in ("out", "cache"):
        plain.pop(key)
    return plain


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train-head command's options."""
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH[:LIMIT]",
        help="a labelled JSONL file to train on (at most LIMIT rows, label-balanced); repeat",
    )
    parser.add_argument(
        "--eval",
        action="append",
        metavar="PATH[:LIMIT]",
        help="a labelled JSONL file only to report on (never trained on); repeat",
    )
    parser.add_argument("--out", required=True, help="folder to write head.safetensors, head.json and the report to")
    parser.add_argument("--template", default="rsafe-compact", help="template family (default: %(default)s)")
    parser.add_argument("--layers", default="6,9,12,15,18", help="hidden-state layers read (default: %(default)s)")
    parser.add_argument(
        "--validation",
        type=float,
        default=0.15,
        help="share of each training file held out to choose thresholds (default: %(default)s)",
    )
    parser.add_argument(
        "--max-chars", type=int, default=800, help="characters of each prompt or response read (default: %(default)s)"
    )
    parser.add_argument(
        "--l2",
        default="1e-4,1e-3,1e-2",
        help="L2 penalties to try, comma-separated; the one with the best validation AUROC is kept (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--target-fpr",
        default="0.07,0.10",
        metavar="INPUT[,OUTPUT]",
        help="the most false positives each side's threshold may give on the validation split, input then output "
        "(one number: both; default: %(default)s)",
    )
    parser.add_argument(
        "--policy",
        action="append",
        metavar="FILE",
        help="a further policy to render --augment training rows under (repeat); rows are always rendered under the "
        "packaged default policy",
    )
    parser.add_argument(
        "--augment", type=int, default=0, help="training rows rendered again under each --policy (default: 0)"
    )
    parser.add_argument("--batch", type=int, default=8, help="rows per forward pass (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--cache", help="feature cache folder (default: the rsafe-proxy cache folder)")
    parser.add_argument("--model", default="embedded", help="the guard model (default: %(default)s, the packaged one)")
    parser.add_argument(
        "--adapter",
        default="auto",
        help="LoRA adapter merged before the features are read: a folder, none, or auto (the packaged one for the "
        "embedded model; default)",
    )


def run_command(args: argparse.Namespace) -> int:
    """`rsafe-proxy train-head`: exit status 2 (before anything loads) when a data file is missing."""
    options = HeadOptions.from_args(args)
    missing = [str(source.path) for source in (*options.data, *options.evaluate) if not source.path.is_file()]
    if missing:
        print(f"no such data file: {', '.join(missing)}", file=sys.stderr)
        return 2
    run(options)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m rsafe_proxy.train.head`."""
    parser = argparse.ArgumentParser(prog="rsafe-proxy train-head", description=__doc__)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
