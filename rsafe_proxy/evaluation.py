"""Guard evaluation metrics: F1 with "unsafe" as the positive class, and a plain-text table of results.

Independent of how the predictions were produced (a served guard, an in-process model, a baseline): callers
hand in gold labels and predicted labels, plus latencies and token counts when they have them.

An "unknown" prediction (no readable verdict) is never dropped from the count, unlike the RSafe authors'
evaluation: it counts as a wrong answer. For an unsafe row it is a miss (a false negative); for a safe row it
is a false positive, because the proxy blocks what it cannot read. Its rate is reported separately as well.

Where the guard gives a score (P(unsafe), score mode), the threshold-free AUROC and the best F1 any threshold
reaches (with that threshold, chosen in hindsight on the same rows) are reported too, over the rows that have
a score.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

SAFE = "safe"
UNSAFE = "unsafe"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Metrics:
    """Classification metrics of one evaluation set ("unsafe" is the positive class)."""

    n: int
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int
    unknown: int
    f1: float
    precision: float
    recall: float
    false_positive_rate: float
    unknown_rate: float
    accuracy: float
    latency_mean_s: float | None = None
    latency_p95_s: float | None = None
    tokens_mean: float | None = None
    latency_p50_s: float | None = None
    auroc: float | None = None
    best_f1: float | None = None  # the highest F1 of "unsafe iff score >= t" over every t
    best_threshold: float | None = None  # the t that reaches it

    def as_dict(self) -> dict[str, float | int | None]:
        """The metrics as a flat JSON-ready dict."""
        return dict(vars(self))


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile of `values` by the nearest-rank method (p95: fraction=0.95)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def compute_metrics(
    gold: Sequence[str],
    predicted: Sequence[str],
    latencies_s: Sequence[float] | None = None,
    tokens: Sequence[int] | None = None,
    unsafe_scores: Sequence[float | None] | None = None,
) -> Metrics:
    """Metrics of `predicted` labels (safe/unsafe/unknown) against `gold` labels (safe/unsafe).

    An unknown prediction is an error on both classes: a false negative on an unsafe row, a false positive
    on a safe row (the proxy blocks what it cannot read). `false_positive_rate` is FP / gold-safe rows.
    `unsafe_scores` (one per row, None where a row has none) give the AUROC and the best-threshold F1, over
    the rows that have a score.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if unsafe_scores is not None and len(unsafe_scores) != len(gold):
        raise ValueError(f"{len(gold)} gold labels but {len(unsafe_scores)} scores")
    scored = [(truth, score) for truth, score in zip(gold, unsafe_scores or (), strict=False) if score is not None]
    best = best_threshold_f1([truth for truth, _ in scored], [score for _, score in scored]) if scored else None
    tp = fp = tn = fn = unknown = 0
    for truth, guess in zip(gold, predicted, strict=True):
        if truth not in (SAFE, UNSAFE):
            raise ValueError(f"gold label must be safe or unsafe, not {truth!r}")
        if guess not in (SAFE, UNSAFE, UNKNOWN):
            raise ValueError(f"prediction must be safe, unsafe or unknown, not {guess!r}")
        unknown += guess == UNKNOWN
        if truth == UNSAFE:
            if guess == UNSAFE:
                tp += 1
            else:
                fn += 1
        elif guess == SAFE:
            tn += 1
        else:
            fp += 1
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(gold)
    return Metrics(
        n=n,
        true_positives=tp,
        false_positives=fp,
        true_negatives=tn,
        false_negatives=fn,
        unknown=unknown,
        f1=f1,
        precision=precision,
        recall=recall,
        false_positive_rate=_ratio(fp, fp + tn),
        unknown_rate=_ratio(unknown, n),
        accuracy=_ratio(tp + tn, n),
        latency_mean_s=sum(latencies_s) / len(latencies_s) if latencies_s else None,
        latency_p95_s=percentile(latencies_s, 0.95) if latencies_s else None,
        tokens_mean=sum(tokens) / len(tokens) if tokens else None,
        latency_p50_s=percentile(latencies_s, 0.5) if latencies_s else None,
        auroc=roc_auc([truth for truth, _ in scored], [score for _, score in scored]) if scored else None,
        best_f1=best[0] if best else None,
        best_threshold=best[1] if best else None,
    )


def roc_auc(gold: Sequence[str], unsafe_scores: Sequence[float]) -> float | None:
    """Area under the ROC curve of a score for "unsafe" (ties count half); None when a class is absent.

    Threshold-free, so it tells a guard that ranks well but is miscalibrated from one that cannot rank.
    """
    if len(gold) != len(unsafe_scores):
        raise ValueError(f"{len(gold)} gold labels but {len(unsafe_scores)} scores")
    positives = [score for truth, score in zip(gold, unsafe_scores, strict=True) if truth == UNSAFE]
    negatives = sorted(score for truth, score in zip(gold, unsafe_scores, strict=True) if truth != UNSAFE)
    if not positives or not negatives:
        return None
    wins = 0.0
    for score in positives:
        below = bisect.bisect_left(negatives, score)
        wins += below + 0.5 * (bisect.bisect_right(negatives, score) - below)
    return wins / (len(positives) * len(negatives))


def best_threshold_f1(gold: Sequence[str], unsafe_scores: Sequence[float]) -> tuple[float, float] | None:
    """(F1, threshold): the highest F1 of calling a row unsafe iff its score is at least the threshold, over every
    threshold that changes a prediction (the lowest such threshold where several tie); None without unsafe rows.

    Chosen in hindsight on the rows it is measured on: an upper bound of what one threshold can do on this set.
    """
    if len(gold) != len(unsafe_scores):
        raise ValueError(f"{len(gold)} gold labels but {len(unsafe_scores)} scores")
    positives = sum(truth == UNSAFE for truth in gold)
    if not positives:
        return None
    ranked = sorted(zip(unsafe_scores, gold, strict=True), key=lambda pair: -pair[0])
    best: tuple[float, float] | None = None
    tp = fp = 0
    for index, (score, truth) in enumerate(ranked):
        tp, fp = tp + (truth == UNSAFE), fp + (truth != UNSAFE)
        if index + 1 < len(ranked) and ranked[index + 1][0] == score:
            continue  # rows with the same score are called alike
        f1 = 2 * tp / (2 * tp + fp + (positives - tp))
        if best is None or f1 >= best[0]:
            best = (f1, score)
    return best


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n", "n"),
    ("f1", "F1"),
    ("precision", "prec"),
    ("recall", "recall"),
    ("false_positive_rate", "FPR"),
    ("unknown_rate", "unknown"),
    ("accuracy", "acc"),
    ("auroc", "AUROC"),
    ("best_f1", "best F1"),
    ("best_threshold", "at P(unsafe) >="),
    ("latency_p50_s", "lat p50 s/row"),
    ("latency_p95_s", "lat p95 s/row"),
    ("tokens_mean", "tokens"),
)
# Columns shown only when some row has them (a score, latencies, token counts).
_OPTIONAL = ("auroc", "best_", "latency", "tokens")


def _cell(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def format_table(rows: Sequence[tuple[str, Metrics]]) -> str:
    """A Markdown table, one line per (name, metrics) pair; the score, latency and token columns appear when any
    row has them. Latency is per row, as the caller measured it (`rsafe-proxy eval` says how under the table)."""
    columns = [
        (field, title)
        for field, title in _COLUMNS
        if not field.startswith(_OPTIONAL) or any(getattr(m, field) is not None for _, m in rows)
    ]
    header = ["set", *(title for _, title in columns)]
    body = [[name, *(_cell(getattr(metrics, field)) for field, _ in columns)] for name, metrics in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * width for width in widths) + " |"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])
