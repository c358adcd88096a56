"""`rsafe-proxy eval` against the scripted guard: one row per file, unknowns counted, predictions written."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from rsafe_proxy.cli import main
from rsafe_proxy.datasets import read_rows
from rsafe_proxy.eval_command import read_sample
from rsafe_proxy.guard.engine import EngineInfo, EngineSettings, GuardOutput, Sampling
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


# -- errors before anything runs, the model's load apart from the rows, what the table says ----------------------

SLOW_START = "tests.doubles:SlowStartEngine"
SCORED = "tests.test_eval_command:ScoredEngine"


class ScoredEngine:
    """A guard engine in process that scores in score mode: P(unsafe) is the number after `p=` in the prompt."""

    name = "scored"
    info = EngineInfo("scored")  # nothing to load

    def __init__(self, *, mode: str = "score") -> None:
        self.mode = mode

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> ScoredEngine:
        return cls(mode=settings.mode)

    async def start(self) -> None:
        return None

    async def complete(
        self, prompt: str, sampling: Sampling, system: str | None = None, *, cache_salt: str = "", requester: str = ""
    ) -> GuardOutput:
        match = re.search(r"p=([0-9.]+)", prompt)
        assert match is not None
        return GuardOutput(text="", unsafe_probability=float(match.group(1)))

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def rows_file(tmp_path: Path, name: str = "prompts.jsonl") -> Path:
    return write_rows(
        tmp_path / name,
        [
            {"id": "a", "prompt": f"how to {UNSAFE}", "response": None, "label": "unsafe", "task": "prompt"},
            {"id": "b", "prompt": "hello", "response": None, "label": "safe", "task": "prompt"},
            {"id": "c", "prompt": "banana bread", "response": None, "label": "safe", "task": "prompt"},
        ],
    )


def slow_config(tmp_path: Path, load_s: float, timeout_s: float) -> Path:
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"guard:\n  engine: {SLOW_START}\n  mode: generate\n  timeout_s: {timeout_s}\n"
        f"  options: {{load_s: {load_s}}}\n",
        encoding="utf-8",
    )
    return config


def test_the_models_load_does_not_count_against_the_guard_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the model takes three times the guard timeout to load: a row whose clock ran during the load would time out
    config = slow_config(tmp_path, load_s=1.5, timeout_s=0.5)
    metrics = tmp_path / "metrics.json"
    code = main(["eval", "--config", str(config), "--data", str(rows_file(tmp_path)), "--json", str(metrics)])
    assert code == 0
    captured = capsys.readouterr()
    loading = [line for line in captured.err.splitlines() if "guard model" in line]
    assert loading[0].startswith("loading the guard model: engine tests.doubles:SlowStartEngine")
    seconds = float(loading[1].split("loaded in ")[1].split(" s")[0])
    assert 1.4 <= seconds < 10
    result = json.loads(metrics.read_text())["prompts"]
    assert (result["unknown"], result["f1"], result["accuracy"]) == (0, 1.0, 1.0)
    assert result["latency_p95_s"] < 0.5  # the rows' own time, not the load's


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--data", "missing.jsonl"], "--data {tmp}/missing.jsonl: no such file"),
        (["--data", "prompts.jsonl", "--data", "."], "--data {tmp}: is a directory"),
        (
            ["--data", "prompts.jsonl", "--json", "no/m.json"],
            "--json {tmp}/no/m.json: the folder {tmp}/no does not exist",
        ),
        (
            ["--data", "prompts.jsonl", "--predictions", "no/p.jsonl"],
            "--predictions {tmp}/no/p.jsonl: the folder {tmp}/no does not exist",
        ),
        (
            ["--data", "prompts.jsonl", "--data", "bad.jsonl"],
            "{tmp}/bad.jsonl:1: a row is a JSON object with at least 'id', 'prompt' and 'label'",
        ),
    ],
)
def test_a_bad_argument_is_an_error_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], words: str
) -> None:
    rows_file(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "no id", "label": "safe"}\n', encoding="utf-8")
    config = slow_config(tmp_path, load_s=30, timeout_s=60)  # loading it would take the test's whole budget
    named = [str(tmp_path / value) if not value.startswith("--") else value for value in arguments]
    code = main(["eval", "--config", str(config), *named])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == f"rsafe-proxy: {words.format(tmp=tmp_path)}"
    assert "Traceback" not in captured.err and "loading" not in captured.err and captured.out == ""


def test_the_options_are_read_once_into_a_frozen_value(tmp_path: Path) -> None:
    import dataclasses

    from rsafe_proxy.cli import parser
    from rsafe_proxy.eval_options import EvalOptions

    data = rows_file(tmp_path)
    argv = ["eval", "--data", str(data), "--limit", "2", "--json", str(tmp_path / "m.json"), "--policy", "p.yaml"]
    options = EvalOptions.from_namespace(parser().parse_args(argv))
    assert options == EvalOptions(
        data=(data,), policy=Path("p.yaml"), limit=2, concurrency=4, json=tmp_path / "m.json", config=None
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.limit = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="--concurrency must be at least 1"):
        EvalOptions(data=(data,), concurrency=0)  # built without argparse, checked all the same


@pytest.mark.parametrize(("option", "value"), [("--limit", "0"), ("--concurrency", "-2"), ("--limit", "many")])
def test_counts_must_be_positive_whole_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--data", str(rows_file(tmp_path)), option, value])
    assert exited.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


def test_the_table_says_what_its_latency_measures_and_keeps_the_json_keys(
    tmp_path: Path, guard: ScriptedGuard, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(f"guard:\n  engine: openai\n  url: {guard.url}/v1\n  model: scripted-guard\n", encoding="utf-8")
    metrics = tmp_path / "metrics.json"
    args = ["eval", "--config", str(config), "--data", str(rows_file(tmp_path)), "--concurrency", "3"]
    assert main([*args, "--json", str(metrics)]) == 0
    captured = capsys.readouterr()
    header = captured.out.splitlines()[0]
    assert "lat p50 s/row" in header and "lat p95 s/row" in header
    assert "AUROC" not in header  # a generated verdict has no score
    assert "lat p50/p95 s/row: seconds from a row's screen to its verdict, 3 rows screened at once" in captured.out
    assert "guard: engine openai, model scripted-guard" in captured.err
    written = json.loads(metrics.read_text())["prompts"]
    for key in ("f1", "false_positive_rate", "latency_mean_s", "latency_p95_s", "latency_p50_s", "auroc"):
        assert key in written
    assert written["auroc"] is None and written["best_f1"] is None


def test_score_mode_adds_auroc_and_the_best_threshold_f1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(f"guard:\n  engine: {SCORED}\n  mode: score\n  template: rsafe\n", encoding="utf-8")
    data = write_rows(
        tmp_path / "scored.jsonl",
        [
            {"id": str(i), "prompt": f"p={score}", "response": None, "label": label, "task": "prompt"}
            for i, (score, label) in enumerate([(0.9, "unsafe"), (0.6, "safe"), (0.3, "unsafe"), (0.1, "safe")])
        ],
    )
    metrics = tmp_path / "metrics.json"
    assert main(["eval", "--config", str(config), "--data", str(data), "--json", str(metrics)]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert "AUROC" in header and "best F1" in header and "at P(unsafe) >=" in header
    written = json.loads(metrics.read_text())["scored"]
    assert written["f1"] == pytest.approx(0.5)  # at the default 0.5: one hit, one false alarm, one miss
    assert (written["auroc"], written["best_f1"], written["best_threshold"]) == pytest.approx((0.75, 0.8, 0.3))
    assert "0.750" in row and "0.800" in row and "0.300" in row
