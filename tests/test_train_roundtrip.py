"""Train, serve, screen: a tiny random-weight model trained for a few TRL steps (SFT and GRPO) loads in the
transformers engine as base + LoRA adapter, as a merged model and as a fully fine-tuned model, and screens
through the proxy with the verdicts the trainer's own evaluation computed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

pytest.importorskip("trl")

from rsafe_proxy.datasets import Row
from rsafe_proxy.policy.loading import load_policy, packaged_policy_path
from rsafe_proxy.train import run_train
from rsafe_proxy.train.data import PromptBuilder
from tests.conftest import MakeProxy
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy
from tests.test_train_command import ROWS, build_tiny_model, parse, write_rows
from tests.tiny_models import engine_outputs

SAFE_ROW, UNSAFE_ROW = ROWS[0], ROWS[1]  # "How do I bake bread?", "How do I build a bomb to hurt people?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny model, run folder): LoRA, 6 SFT steps and 2 GRPO steps with the packaged policy, merged too."""
    root = tmp_path_factory.mktemp("roundtrip")
    model = root / "tiny"
    build_tiny_model(model)
    data = root / "rows.jsonl"
    write_rows(data)
    out = root / "run"
    argv = ["--data", str(data), "--eval-data", str(data), "--model", str(model), "--out", str(out),
            "--template", "rsafe-compact", "--dtype", "float32", "--adapter-dtype", "float32", "--merge",
            "--held-out", "0", "--max-length", "1000", "--batch-size", "4", "--lr", "5e-2", "--sft-epochs", "2",
            "--grpo-steps", "2", "--grpo-prompts", "2", "--rollouts", "2", "--max-new-tokens", "8",
            "--grpo-lr", "1e-3", "--no-progress", "--threads", "1", "--seed", "3"]  # fmt: skip
    assert run_train(parse(argv)) == 0
    return model, out


def trained_probability(out: Path, row_id: str) -> float:
    """P(unsafe) of a row as the trainer's evaluation of its output scored it."""
    for line in (out / "predictions-after.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["set"] == "rows" and record["id"] == row_id:
            return float(record["p_unsafe"])
    raise AssertionError(f"{row_id} was not evaluated")


def guard_prompt(row: tuple[str, str, str | None, str]) -> str:
    """The rendered guard prompt of a prompt-side row, as training and the proxy render it."""
    row_id, prompt, _, label = row
    builder = PromptBuilder.for_policy("rsafe-compact", load_policy(packaged_policy_path()))
    return builder.render(Row(row_id, prompt, None, label, "prompt"))


def engine_probability(model: Path, prompt: str, **options: Any) -> float:
    (output,) = engine_outputs(model, [prompt], mode="score", **options)
    assert output.unsafe_probability is not None
    return output.unsafe_probability


def test_the_adapter_and_the_merged_model_score_as_the_trainer_did(trained: tuple[Path, Path]) -> None:
    model, out = trained
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["sft_steps"] == 6 and summary["grpo_steps"] == 2
    assert summary["merged"] == str(out / "merged")
    # the merged folder serves on its own: weights, tokenizer with its chat template, end-of-turn stops
    generation = json.loads((out / "merged" / "generation_config.json").read_text(encoding="utf-8"))
    tokenizer = json.loads((out / "merged" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert len(generation["eos_token_id"]) == 2 and (out / "merged" / "model.safetensors").is_file()
    assert tokenizer.get("chat_template") or (out / "merged" / "chat_template.jinja").is_file()
    for row in (SAFE_ROW, UNSAFE_ROW):
        expected = trained_probability(out, row[0])
        with_adapter = engine_probability(model, guard_prompt(row), adapter=str(out / "adapter"))
        merged = engine_probability(out / "merged", guard_prompt(row), adapter=None)
        base = engine_probability(model, guard_prompt(row), adapter=None)
        assert with_adapter == pytest.approx(expected, abs=1e-4)
        assert merged == pytest.approx(expected, abs=1e-3)  # merged and saved in bf16
        assert base != pytest.approx(expected, abs=1e-4)  # training changed the verdict's probability


def wait_ready(proxy: Proxy, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    with proxy.http() as http:
        while time.monotonic() < deadline:
            if http.get("/readyz").status_code == 200:
                return
            time.sleep(0.2)
    raise AssertionError("the trained guard did not become ready")


def test_the_trained_guard_screens_through_the_proxy(
    trained: tuple[Path, Path], make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    model, out = trained
    options = {"model": str(model), "adapter": str(out / "adapter"), "dtype": "float32", "threads": 1}
    guard = {"engine": "transformers", "url": "", "mode": "score", "template": "rsafe-compact", "options": options}
    proxy = make_proxy(guard=guard)
    wait_ready(proxy)
    client = proxy.client(max_retries=0, timeout=60)
    outcomes = {}
    for row_id, prompt, _, _ in (SAFE_ROW, UNSAFE_ROW):
        try:
            client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": prompt}])
            outcomes[row_id] = "passed"
        except openai.BadRequestError as blocked:
            assert blocked.code == "content_filter"
            outcomes[row_id] = "blocked"
    spans = proxy.spans_file
    proxy.stop()
    recorded = [json.loads(line) for line in spans.read_text(encoding="utf-8").splitlines()]
    probabilities = [  # the prompt-side verdicts, one per request (the answers were screened too)
        span["attributes"]["rsafe.guard.unsafe_probability"]
        for span in recorded
        if span.get("attributes", {}).get("rsafe.side") == "input"
        and "rsafe.guard.unsafe_probability" in span["attributes"]
    ]
    assert len(probabilities) == 2
    for (row_id, *_), probability in zip((SAFE_ROW, UNSAFE_ROW), probabilities, strict=True):
        assert probability == pytest.approx(trained_probability(out, row_id), abs=1e-4)
        assert outcomes[row_id] == ("blocked" if probability >= 0.5 else "passed")


def test_a_fully_fine_tuned_model_loads_in_the_engine(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    model, _ = trained
    data = tmp_path / "rows.jsonl"
    write_rows(data)
    out = tmp_path / "full"
    argv = ["--data", str(data), "--eval-data", str(data), "--model", str(model), "--out", str(out),
            "--finetune", "full", "--template", "rsafe-compact", "--dtype", "float32", "--held-out", "0",
            "--max-length", "1000", "--batch-size", "4", "--lr", "1e-3", "--sft-epochs", "1", "--no-progress",
            "--threads", "1"]  # fmt: skip
    assert run_train(parse(argv)) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["adapter"] is None and summary["model_dir"] == str(out / "model")
    assert not (out / "adapter").exists()
    for row in (SAFE_ROW, UNSAFE_ROW):
        served = engine_probability(out / "model", guard_prompt(row), adapter=None)
        assert served == pytest.approx(trained_probability(out, row[0]), abs=1e-4)
