"""The verdict head (guard/head.py): the transformers engine scores with it where one lies beside the model, its
features are the engine's own, its per-side thresholds reach the screener, and `rsafe-proxy train-head` trains
one end to end on a tiny model built here."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rsafe_proxy.cli import main as cli_main
from rsafe_proxy.config import GuardSettings
from rsafe_proxy.datasets import Row
from rsafe_proxy.guard.engines.transformers import TransformersEngine
from rsafe_proxy.guard.head import HeadInfo, VerdictHead, save_head
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.guard.screen import ScreenSettings
from rsafe_proxy.policy.loading import load_policy, packaged_policy_path
from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.runtime import build_engine, build_screener
from rsafe_proxy.train.head import _limited, calibration_error, choose_threshold, fit, predict
from tests.tiny_models import PREFIX, PROMPTS, build_tiny_model, engine_outputs

LAYERS = (1, 2)
HIDDEN = 32  # tests/tiny_models.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), vocab_size=300)


@pytest.fixture(scope="module")
def headed(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Path:
    """The tiny model with a random head beside it (thresholds 0.3 on input, 0.7 on output)."""
    folder = Path(shutil.copytree(tiny, tmp_path_factory.mktemp("headed") / "model"))
    generator = np.random.default_rng(0)
    width = len(LAYERS) * HIDDEN
    info = HeadInfo(LAYERS, {"input": 0.3, "output": 0.7}, "rsafe-compact", HIDDEN)
    save_head(
        folder, info, generator.normal(size=width), 0.2, generator.normal(size=width), 1 + generator.random(width)
    )
    return folder


def manual_head_probability(folder: Path, prompt: str) -> float:
    """The head's P(unsafe) from one whole-sequence forward pass: no padding, cache or batching."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)
    ids = tokenizer.encode(text + PREFIX, add_special_tokens=False)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    features = torch.cat([hidden[layer][0, -1] for layer in LAYERS]).numpy()
    head = VerdictHead.load(folder)
    assert head is not None
    return head.score(torch.tensor(features[None, :]))[0]


def test_the_engine_scores_with_the_head_beside_the_model(headed: Path, tiny: Path) -> None:
    with_head = engine_outputs(headed, PROMPTS, mode="score", adapter=None)
    without = engine_outputs(tiny, PROMPTS, mode="score", adapter=None)
    for prompt, output in zip(PROMPTS, with_head, strict=True):
        assert output.unsafe_probability == pytest.approx(manual_head_probability(headed, prompt), abs=1e-4)
    assert [o.unsafe_probability for o in with_head] != pytest.approx([o.unsafe_probability for o in without])


def test_head_scores_are_the_same_on_a_reused_prefix(headed: Path) -> None:
    """Prompts sharing a long policy-like prefix run on its stored cache; the head reads the same states."""
    shared = "Policy: " + "the guard reads every category and answers safe or unsafe. " * 4
    prompts = [shared + prompt for prompt in PROMPTS]
    reused = engine_outputs(headed, prompts, mode="score", adapter=None)
    assert sum(output.cached_tokens for output in reused) > 0
    fresh = engine_outputs(headed, prompts, mode="score", adapter=None, prefix_cache=0)
    assert [o.unsafe_probability for o in reused] == pytest.approx([o.unsafe_probability for o in fresh], abs=1e-4)


def test_features_are_what_the_head_reads(headed: Path) -> None:
    engine = TransformersEngine(model=str(headed), adapter=None, dtype="float32")
    runner = engine._load()
    head = runner.head
    assert head is not None
    jobs = [([{"role": "user", "content": prompt}], ScreenSettings().sampling, "salt") for prompt in PROMPTS]
    features = torch.tensor(runner.features(jobs, LAYERS))
    assert features.shape == (len(PROMPTS), len(LAYERS) * HIDDEN)
    outputs = engine_outputs(headed, PROMPTS, mode="score", adapter=None)
    assert head.score(features) == pytest.approx([o.unsafe_probability for o in outputs], abs=1e-4)


def test_a_head_whose_tensors_do_not_match_is_refused(tmp_path: Path) -> None:
    info = HeadInfo(LAYERS, {"input": 0.5}, "rsafe-compact", HIDDEN)
    save_head(tmp_path, info, np.zeros(10), 0.0, np.zeros(10), np.ones(10))
    with pytest.raises(ValueError, match="do not match"):
        VerdictHead.load(tmp_path)


def test_a_threshold_outside_zero_and_one_is_refused(tmp_path: Path) -> None:
    info = HeadInfo(LAYERS, {"input": 1.0}, "rsafe-compact", HIDDEN)
    save_head(tmp_path, info, np.zeros(64), 0.0, np.zeros(64), np.ones(64))
    with pytest.raises(ValueError, match="strictly between"):
        HeadInfo.read(tmp_path)


def _policy(**guard: object) -> Policy:
    policy = load_policy(packaged_policy_path())
    return Policy.model_validate({**policy.model_dump(mode="json", exclude={"version"}), "guard": guard})


def test_thresholds_come_from_the_policy_then_the_head_then_the_configuration(headed: Path) -> None:
    guard = GuardSettings(engine="transformers", options={"model": str(headed), "adapter": None})
    engine = build_engine(guard)
    assert dict(engine.info.score_thresholds) == {Side.INPUT: 0.3, Side.OUTPUT: 0.7}
    settings = build_screener(guard, engine).settings
    plain = load_policy(packaged_policy_path())
    assert settings.threshold(plain, Side.INPUT) == 0.3
    assert settings.threshold(plain, Side.OUTPUT) == 0.7
    assert settings.threshold(_policy(score_threshold=0.9), Side.OUTPUT) == 0.9
    one_side = _policy(score_threshold={"output": 0.4})
    assert (settings.threshold(one_side, Side.INPUT), settings.threshold(one_side, Side.OUTPUT)) == (0.3, 0.4)
    configured = GuardSettings(engine="transformers", score_threshold=0.6, options={"model": str(headed)})
    chosen = build_screener(configured, TransformersEngine(model=str(headed), adapter=None)).settings
    assert chosen.score_thresholds == ()  # the configured threshold overrides the head's
    assert chosen.threshold(plain, Side.INPUT) == 0.6


def test_other_engines_have_no_head_thresholds() -> None:
    guard = GuardSettings(engine="openai", url="http://127.0.0.1:9")
    engine = build_engine(guard)
    assert engine.info.score_thresholds == ()
    assert build_screener(guard, engine).settings.threshold(_policy(), Side.INPUT) == 0.5


def test_a_policy_threshold_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="score_threshold"):
        _policy(score_threshold={"input": 1.5})


def _row(index: int, label: str, origin: str = "set") -> Row:
    return Row(id=f"{origin}-{index}", prompt=f"text {index}", response=None, label=label, task="prompt", origin=origin)


def test_a_capped_file_keeps_both_labels_as_evenly_as_it_can() -> None:
    rows = [_row(i, "unsafe") for i in range(90)] + [_row(90 + i, "safe") for i in range(10)]
    kept = _limited(rows, 40, seed=0)
    assert len(kept) == 40
    assert sum(row.label == "safe" for row in kept) == 10  # all of the scarce label, the rest from the other
    assert _limited(rows, 40, seed=0) == kept
    assert _limited(rows, None, seed=0) == rows


def test_the_threshold_keeps_the_false_positive_rate_within_the_target() -> None:
    labels = [0] * 80 + [1] * 20
    scores = [i / 100 for i in range(80)] + [0.5 + i / 50 for i in range(20)]
    threshold = choose_threshold(labels, scores, target_fpr=0.05)
    negatives = [s for y, s in zip(labels, scores, strict=True) if not y]
    assert sum(s >= threshold for s in negatives) / len(negatives) <= 0.05
    assert 0 < threshold < 1


def test_calibration_error_is_zero_when_predictions_match_rates() -> None:
    assert calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)
    assert calibration_error([1, 1], [0.05, 0.05]) == pytest.approx(0.95)


def test_fit_separates_separable_features() -> None:
    generator = np.random.default_rng(1)
    features = np.vstack([generator.normal(-1, 1, (60, 5)), generator.normal(1, 1, (20, 5))]).astype(np.float32)
    labels = np.array([0.0] * 60 + [1.0] * 20)
    weight, bias, mean, scale = fit(features, labels, l2=1e-3)
    scores = predict(features, weight, bias, mean, scale)
    assert scores[:60].mean() < 0.3 < 0.7 < scores[60:].mean()


def _write(path: Path, rows: Sequence[Mapping[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_train_head_trains_a_head_the_engine_then_uses(tiny: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny, tmp_path / "model"))
    prompts = [
        {
            "id": f"p{i}",
            "prompt": f"{'weapon attack ' if i % 2 else 'bread recipe '}{i}",
            "response": None,
            "label": "unsafe" if i % 2 else "safe",
            "task": "prompt",
        }
        for i in range(40)
    ]
    answers = [
        {
            "id": f"r{i}",
            "prompt": "question",
            "response": f"{'attack them ' if i % 2 else 'bake it '}{i}",
            "label": "unsafe" if i % 2 else "safe",
            "task": "response",
        }
        for i in range(24)
    ]
    data = _write(tmp_path / "train.jsonl", [*prompts, *answers])
    unseen = _write(tmp_path / "unseen.jsonl", prompts[:6])
    out = tmp_path / "head"
    argv = [
        "train-head",
        "--model",
        str(model),
        "--adapter",
        "none",
        "--layers",
        "1,2",
        "--data",
        str(data),
        "--eval",
        f"{unseen}:4",
        "--validation",
        "0.3",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert cli_main(argv) == 0
    report = json.loads((out / "head-report.json").read_text())
    assert report["rows"]["unseen"] == 4
    assert set(report["thresholds"]) == {"input", "output"}
    training = next(entry for entry in report["reports"] if entry["set"] == "validation (input)")
    assert training["n"] > 0 and training["auroc"] is not None
    shards = list((tmp_path / "cache").glob("features-*/shard-*.npz"))
    assert cli_main(argv) == 0  # a second run reads the stored features, computes none
    assert list((tmp_path / "cache").glob("features-*/shard-*.npz")) == shards
    for name in ("head.safetensors", "head.json"):
        shutil.copy(out / name, model / name)
    outputs = engine_outputs(model, ["bread recipe 3", "weapon attack 4"], mode="score", adapter=None)
    assert all(output.unsafe_probability is not None for output in outputs)


def test_train_head_refuses_a_missing_data_file_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.jsonl"
    assert (
        cli_main(["train-head", "--model", str(tmp_path / "no-model"), "--data", str(missing), "--out", str(tmp_path)])
        == 2
    )
    assert "no such data file" in capsys.readouterr().err


def test_serve_names_the_embedded_guard_and_its_limits_in_one_line() -> None:
    from rsafe_proxy.runtime import guard_notice

    notice = guard_notice(GuardSettings())
    assert notice is not None and "\n" not in notice
    assert "embedded" in notice and "RSAFE_GUARD_URL" in notice and "README" in notice
    assert guard_notice(GuardSettings(url="http://127.0.0.1:9")) is None
    assert guard_notice(GuardSettings(engine="transformers", options={"model": "/some/model"})) is None
