"""Evaluation metrics: F1 with unsafe positive, unknown counted as an error, latency and the table."""

from __future__ import annotations

import pytest

from rsafe_proxy.evaluation import Metrics, best_threshold_f1, compute_metrics, format_table, percentile, roc_auc

S, U, X = "safe", "unsafe", "unknown"


@pytest.mark.parametrize(
    ("gold", "predicted", "expected"),
    [
        # perfect
        ([U, U, S, S], [U, U, S, S], {"f1": 1.0, "precision": 1.0, "recall": 1.0, "false_positive_rate": 0.0}),
        # "unsafe" for everything: recall 1, precision = share of unsafe rows
        ([U, S, S, S], [U, U, U, U], {"precision": 0.25, "recall": 1.0, "f1": 0.4, "false_positive_rate": 1.0}),
        # "safe" for everything: nothing found, F1 0 (not undefined)
        ([U, S], [S, S], {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.5}),
        # one of each error
        ([U, U, S, S], [U, S, U, S], {"true_positives": 1, "false_negatives": 1, "false_positives": 1, "f1": 0.5}),
        # unknown on an unsafe row is a miss, on a safe row a false positive; both count in the unknown rate
        (
            [U, U, S, S],
            [X, U, X, S],
            {
                "true_positives": 1,
                "false_negatives": 1,
                "false_positives": 1,
                "true_negatives": 1,
                "unknown": 2,
                "unknown_rate": 0.5,
                "accuracy": 0.5,
                "false_positive_rate": 0.5,
            },
        ),
        # all unknown: every row wrong, nothing dropped from n
        ([U, S, S], [X, X, X], {"n": 3, "accuracy": 0.0, "recall": 0.0, "false_positive_rate": 1.0, "f1": 0.0}),
        # no safe rows: the false-positive rate is 0, not undefined
        ([U, U], [U, S], {"false_positive_rate": 0.0, "recall": 0.5, "precision": 1.0}),
        ([], [], {"n": 0, "f1": 0.0, "accuracy": 0.0, "unknown_rate": 0.0}),
    ],
)
def test_metrics_table(gold: list[str], predicted: list[str], expected: dict[str, float]) -> None:
    metrics = compute_metrics(gold, predicted).as_dict()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name


def test_counts_add_up() -> None:
    gold = [U, U, U, S, S, S, S]
    predicted = [U, X, S, U, S, X, S]
    metrics = compute_metrics(gold, predicted)
    assert metrics.true_positives + metrics.false_negatives == gold.count(U)
    assert metrics.true_negatives + metrics.false_positives == gold.count(S)
    assert metrics.n == len(gold)


@pytest.mark.parametrize(("gold", "predicted"), [([U], [U, S]), ([U, S], [U])])
def test_lengths_must_match(gold: list[str], predicted: list[str]) -> None:
    with pytest.raises(ValueError, match="gold labels"):
        compute_metrics(gold, predicted)


@pytest.mark.parametrize(("gold", "predicted", "message"), [([X], [U], "gold label"), ([U], ["maybe"], "prediction")])
def test_labels_are_checked(gold: list[str], predicted: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(gold, predicted)


def test_latency_and_tokens() -> None:
    latencies = [0.1 * step for step in range(1, 21)]  # 0.1 .. 2.0
    metrics = compute_metrics([U] * 20, [U] * 20, latencies, [10] * 10 + [20] * 10)
    assert metrics.latency_mean_s == pytest.approx(1.05)
    assert metrics.latency_p95_s == pytest.approx(1.9)
    assert metrics.tokens_mean == 15
    assert compute_metrics([U], [U]).latency_mean_s is None


@pytest.mark.parametrize(
    ("values", "fraction", "expected"), [([3.0], 0.95, 3.0), ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0), ([4.0, 1.0], 1.0, 4.0)]
)
def test_percentile_nearest_rank(values: list[float], fraction: float, expected: float) -> None:
    assert percentile(values, fraction) == expected


def test_percentile_of_nothing() -> None:
    with pytest.raises(ValueError):
        percentile([], 0.95)


def test_format_table() -> None:
    rows: list[tuple[str, Metrics]] = [
        ("xstest", compute_metrics([U, S], [U, U])),
        ("held-out", compute_metrics([U, S], [U, S])),
    ]
    table = format_table(rows).splitlines()
    assert table[0].split("|")[1:-1] == [
        f" {'set':<8} ",
        " n ",
        "    F1 ",
        "  prec ",
        " recall ",
        "   FPR ",
        " unknown ",
        "   acc ",
    ]
    assert set(table[1]) <= {"|", "-", " "}
    assert table[2].startswith("| xstest   | 2 | 0.667 | 0.500 |  1.000 | 1.000 |")
    assert table[3].startswith("| held-out | 2 | 1.000 |")


def test_format_table_shows_latency_when_known() -> None:
    table = format_table([("a", compute_metrics([U], [U], [0.25], [7])), ("b", compute_metrics([U], [U]))])
    header, _, first, second = table.splitlines()
    assert "lat p50 s/row" in header and "lat p95 s/row" in header and "tokens" in header
    assert "0.250" in first and "7.000" in first
    assert "AUROC" not in header and "best F1" not in header  # no row has a score
    assert second.rstrip(" |").endswith("-")


@pytest.mark.parametrize(
    ("gold", "scores", "expected"),
    [
        ([U, U, S, S], [0.9, 0.8, 0.2, 0.1], 1.0),
        ([U, U, S, S], [0.1, 0.2, 0.8, 0.9], 0.0),
        ([U, S], [0.5, 0.5], 0.5),
        ([U, U, S, S], [0.9, 0.3, 0.6, 0.1], 0.75),
        ([U, U], [0.9, 0.1], None),
    ],
)
def test_roc_auc(gold: list[str], scores: list[float], expected: float | None) -> None:
    assert roc_auc(gold, scores) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("gold", "scores", "expected"),
    [
        ([U, U, S, S], [0.9, 0.8, 0.2, 0.1], (1.0, 0.8)),  # the lowest threshold that still separates them
        ([U, U, S, S], [0.9, 0.3, 0.6, 0.1], (0.8, 0.3)),
        ([U, S], [0.5, 0.5], (2 / 3, 0.5)),  # tied rows are called alike
        ([U, S, S], [0.1, 0.9, 0.8], (0.5, 0.1)),  # ranked backwards: calling everything unsafe is the best
        ([S, S], [0.2, 0.7], None),
    ],
)
def test_best_threshold_f1(gold: list[str], scores: list[float], expected: tuple[float, float] | None) -> None:
    assert best_threshold_f1(gold, scores) == (None if expected is None else pytest.approx(expected))


def test_scores_give_auroc_and_the_best_threshold_over_the_rows_that_have_one() -> None:
    metrics = compute_metrics([U, U, S, S, U], [U, S, U, S, X], None, None, [0.9, 0.3, 0.6, 0.1, None])
    assert (metrics.auroc, metrics.best_f1, metrics.best_threshold) == pytest.approx((0.75, 0.8, 0.3))
    assert metrics.unknown == 1 and metrics.false_negatives == 2  # the unscored unknown row still counts as a miss
    assert compute_metrics([U, S], [U, S], None, None, [None, None]).auroc is None
    with pytest.raises(ValueError, match="2 gold labels but 1 scores"):
        compute_metrics([U, S], [U, S], None, None, [0.5])


def test_the_median_latency() -> None:
    assert compute_metrics([U] * 3, [U] * 3, [0.3, 0.1, 0.2]).latency_p50_s == pytest.approx(0.2)
