"""The README's `rsafe-proxy eval` example runs from a clone: the data file it names ships in examples/."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from rsafe_proxy.cli import main
from rsafe_proxy.datasets import read_rows
from tests.doubles import ScriptedGuard
from tests.serving import proxy_config, unused_url

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "eval-sample.jsonl"


def _readme_eval_data() -> list[str]:
    """The --data files of the README's eval examples that are meant to run from a clone (not ../shared, not the
    '…' that stands for the other benchmark files)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The embedded default model", 1)[1].split("\n## ", 1)[0]
    files = []
    for line in re.findall(r"^rsafe-proxy eval .*$", section, flags=re.MULTILINE):
        words = shlex.split(line, comments=True)
        files += [words[i + 1] for i, word in enumerate(words) if word == "--data"]
    return [file for file in files if not file.startswith("../shared/") and file != "…"]


def test_the_readme_eval_example_names_a_file_of_the_repository() -> None:
    assert _readme_eval_data() == ["examples/eval-sample.jsonl"]
    rows = read_rows(ROOT / "examples" / "eval-sample.jsonl")
    assert {row.label for row in rows} == {"safe", "unsafe"}
    assert {row.task for row in rows} == {"prompt", "response"}
    assert len({row.id for row in rows}) == len(rows)


def test_the_sample_runs_through_eval(guard: ScriptedGuard, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump(proxy_config(unused_url(), guard.url, tmp_path)), encoding="utf-8")
    metrics = tmp_path / "metrics.json"
    assert main(["--config", str(config), "eval", "--data", str(SAMPLE), "--json", str(metrics)]) == 0
    rows = read_rows(SAMPLE)
    assert len(guard.calls) == len(rows)
    assert re.search(rf"^\| eval-sample \| +{len(rows)} \|", capsys.readouterr().out, flags=re.MULTILINE)
    assert json.loads(metrics.read_text(encoding="utf-8"))["eval-sample"]["n"] == len(rows)
