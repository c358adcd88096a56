"""Each engine builds itself from the guard settings (the registry stays names and "module:attr" strings); the
runtime knows no engine's options."""

from __future__ import annotations

import asyncio

import pytest

from rsafe_proxy.config import GuardSettings
from rsafe_proxy.guard.engine import EngineInfo, EngineSettings, GuardEngine, engine_from_settings
from rsafe_proxy.guard.engines.openai import OpenAIEngine
from rsafe_proxy.guard.engines.transformers import TransformersEngine
from rsafe_proxy.runtime import build_engine, guard_description


class NoFactory:
    """A `module:Class` with no from_settings."""

    name = "no-factory"


class Custom:
    """A custom engine (`tests.test_engine_settings:Custom`) that keeps the settings it was built from."""

    name = "custom"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.info = EngineInfo("custom", str(settings.options.get("model")))

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Custom:
        return cls(settings)

    async def start(self) -> None:
        return None

    async def complete(self, prompt: str, sampling: object, system: str | None = None, **_: str) -> object:
        raise NotImplementedError

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def test_the_openai_engine_takes_the_guard_url_model_and_pool() -> None:
    guard = GuardSettings(url="http://127.0.0.1:9/v1", api_key="sk-guard", max_connections=3, timeout_s=7)
    engine = build_engine(guard)
    assert isinstance(engine, OpenAIEngine) and isinstance(engine, GuardEngine)
    assert engine.info == EngineInfo("openai", "rsafe", "http://127.0.0.1:9/v1", loads_model=False)
    assert guard_description(guard, engine) == "engine openai, model rsafe at http://127.0.0.1:9/v1, mode generate"
    asyncio.run(engine.start())  # nothing to load: returns at once, and the server is still not there
    assert asyncio.run(engine.ready()) is False
    asyncio.run(engine.aclose())


def test_the_openai_engine_needs_a_url() -> None:
    with pytest.raises(ValueError, match=r"guard.url \(RSAFE_GUARD_URL\) is required by the openai guard engine"):
        engine_from_settings(EngineSettings(engine="openai"))


def test_an_in_process_engine_takes_its_options_and_the_resolved_mode() -> None:
    guard = GuardSettings(engine="transformers", options={"model": "embedded", "max_batch": 2})
    assert guard.engine_settings().mode == "score"  # auto: the embedded model scores
    engine = build_engine(guard)
    assert isinstance(engine, TransformersEngine)
    assert (engine.info.provider, engine.info.model, engine.info.loads_model) == ("transformers", "embedded", True)
    assert guard_description(guard, engine) == "engine transformers, model embedded, mode score"
    with pytest.raises(TypeError, match="max_batchh"):
        build_engine(GuardSettings(engine="transformers", options={"max_batchh": 2}))


def test_a_custom_engine_is_built_by_its_own_class() -> None:
    guard = GuardSettings(engine=f"{__name__}:Custom", url="http://guard", options={"model": "mine"})
    engine = build_engine(guard)
    assert isinstance(engine, Custom)
    assert engine.settings == guard.engine_settings()
    assert engine.settings.engine == f"{__name__}:Custom"
    assert guard_description(guard, engine) == f"engine {__name__}:Custom, model mine, mode generate"


def test_a_class_without_from_settings_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="NoFactory has no from_settings"):
        build_engine(GuardSettings(engine=f"{__name__}:NoFactory"))
    with pytest.raises(ValueError, match="unknown guard engine 'nope'"):
        build_engine(GuardSettings(engine="nope"))
