"""The parts of the vllm engine that run without vLLM: options, the missing-vLLM error, the merged adapter copy.

The engine itself runs for real in tests/test_engine_conformance.py (with RSAFE_VLLM_PYTHON, see .ci/vllm).
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from rsafe_proxy.guard.engine import GuardEngineError, Sampling, load_engine
from rsafe_proxy.guard.engines.transformers import TransformersEngine
from rsafe_proxy.guard.engines.vllm import VLLMEngine, merged_model_dir, resolve_model
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), vocab_size=300)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Path:
    """A LoRA adapter with random (not zero) weights, so merging it changes the model's outputs."""
    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), config).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize(
    ("option", "value"),
    [("mode", "classify"), ("dtype", "int8"), ("max_model_len", 0), ("kv_cache_memory_bytes", -1)],
)
def test_bad_options_are_refused_at_construction(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        VLLMEngine(**{option: value})


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_engine_fails_as_a_guard_engine_error(tiny: Path) -> None:
    async def main() -> tuple[str, str, bool]:
        engine = load_engine("vllm", {"model": str(tiny), "adapter": None, "mode": "generate"})
        with pytest.raises(GuardEngineError) as first:
            await engine.complete("hello", Sampling(max_tokens=4))
        with pytest.raises(GuardEngineError) as second:  # remembered: no second attempt at loading
            await engine.complete("hello", Sampling(max_tokens=4))
        ready = await engine.ready()
        await engine.aclose()
        return str(first.value), str(second.value), ready

    first, second, ready = asyncio.run(main())
    assert "ModuleNotFoundError" in first and "vllm" in first
    assert second == first
    assert not ready


def test_resolve_model_without_an_adapter_is_the_model_itself(tiny: Path) -> None:
    assert resolve_model(str(tiny), None) == tiny
    assert resolve_model(str(tiny), "auto") == tiny  # "auto" means the packaged adapter of the embedded model only


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a transformers method deprecated for v6
def test_the_merged_copy_scores_as_the_transformers_engine_with_the_adapter(
    tiny: Path, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RSAFE_CACHE_DIR", str(tmp_path))
    merged = resolve_model(str(tiny), str(adapter))
    assert merged.parent == tmp_path and merged != tiny
    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    assert merged_model_dir(tiny, adapter) == merged  # cached: not merged again
    assert (merged / "model.safetensors").stat().st_mtime_ns == stamp

    async def score(model: Path, adapter_path: Path | None) -> float | None:
        engine = TransformersEngine(model=str(model), adapter=None if adapter_path is None else str(adapter_path))
        try:
            return (await engine.complete("Is this safe?", Sampling())).unsafe_probability
        finally:
            await engine.aclose()

    with_adapter = asyncio.run(score(tiny, adapter))
    assert asyncio.run(score(merged, None)) == with_adapter
    assert asyncio.run(score(tiny, None)) != with_adapter
