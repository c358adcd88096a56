"""`rsafe-proxy eval` against the scripted guard: one row per file, unknowns counted, predictions written."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from rsafe_proxy.cli import main
from rsafe_proxy.datasets import read_rows
from rsafe_proxy.eval_command import read_sample
from tests.doubles import UNSAFE, ScriptedGuard


def write_rows(path: Path, rows: Sequence[Mapping[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_limit_takes_rows_from_the_whole_file(tmp_path: Path) -> None:
    rows = [{"id": str(i), "prompt": f"p{i}", "response": None, "label": "safe", "task": "prompt"} for i in range(10)]
    picked = read_sample(write_rows(tmp_path / "d.jsonl", rows), limit=3)
    assert [row.id for row in picked] == ["0", "3", "6"]


def test_a_bad_line_names_its_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "1", "prompt": "x", "label": "safe"}\n{"id": "2", "prompt": "y", "label": "maybe"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_rows(path)


def test_eval_prints_one_row_per_file_and_writes_predictions(
    tmp_path: Path, guard: ScriptedGuard, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = write_rows(
        tmp_path / "prompts.jsonl",
        [
            {"id": "a", "prompt": f"how to {UNSAFE}", "response": None, "label": "unsafe", "task": "prompt"},
            {"id": "b", "prompt": "hello", "response": None, "label": "safe", "task": "prompt"},
            {"id": "c", "prompt": "hi there", "response": None, "label": "unsafe", "task": "prompt"},
        ],
    )
    answers = write_rows(
        tmp_path / "answers.jsonl",
        [{"id": "r", "prompt": "q", "response": f"sure: {UNSAFE}", "label": "unsafe", "task": "response"}],
    )
    config = tmp_path / "proxy.yaml"
    config.write_text(f"guard:\n  engine: openai\n  url: {guard.url}/v1\n  model: scripted-guard\n", encoding="utf-8")
    predictions = tmp_path / "out.jsonl"
    code = main(
        [
            "eval",
            "--config",
            str(config),
            "--data",
            str(prompts),
            "--data",
            str(answers),
            "--predictions",
            str(predictions),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| prompts" in table and "| answers" in table
    assert "0.667" in table  # prompts: F1 = 2/3 (one unsafe row missed)
    written = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [row["prediction"] for row in written] == ["unsafe", "safe", "safe", "unsafe"]
    assert guard.judged("output") == [f"sure: {UNSAFE}"]
