"""The one small interface every guard engine implements, and the registry that picks one by name.

An engine is a class with `from_settings(EngineSettings)` (it reads the parts of the guard settings it uses) whose
instances are GuardEngines: `start()` loads what must be loaded, `complete()` judges one prompt, `ready()` says
whether it can judge now, `aclose()` releases it, and `info` tells it in logs and spans. The registry is data:
"module:attr" strings, imported only when chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rsafe_proxy.extras import require_engine_extra
from rsafe_proxy.guard.protocol import Side

ENGINES: Mapping[str, str] = {
    "openai": "rsafe_proxy.guard.engines.openai:OpenAIEngine",
    "transformers": "rsafe_proxy.guard.engines.transformers:TransformersEngine",
    "vllm": "rsafe_proxy.guard.engines.vllm:VLLMEngine",
}
# Characters of content per guard call, by engine: the embedded model on a CPU judges shorter segments (each
# costs it about a second, and others queue behind it); a server-hosted guard has the room and the speed.
SEGMENT_CHARS: Mapping[str, int] = {"openai": 12_000, "transformers": 4_000, "vllm": 12_000}
DEFAULT_SEGMENT_CHARS = 8_000
# The packaged model's name (guard.options.model; the in-process engines' default model), and the engine that runs
# it as the default guard: on CPU, in score mode, with the compact template (see is_embedded_guard).
EMBEDDED_MODEL = "embedded"
EMBEDDED_ENGINE = "transformers"


def is_embedded_guard(engine: str, options: Mapping[str, Any]) -> bool:
    """Whether guard engine `engine` with its `options` (guard.options) is the embedded default guard: the
    transformers engine on the packaged model, which it runs unless `options` name another."""
    return engine == EMBEDDED_ENGINE and options.get("model", EMBEDDED_MODEL) == EMBEDDED_MODEL


@dataclass(frozen=True)
class Sampling:
    """Generation settings for one guard call (the RSafe authors' defaults)."""

    temperature: float = 0.7
    top_p: float = 0.8
    repetition_penalty: float = 1.05
    max_tokens: int = 512


@dataclass(frozen=True)
class GuardOutput:
    """What an engine returns for one rendered guard prompt.

    `text` is the model's own output (reasoning and boxed answer) in `generate` mode. In `score` mode the
    engine decodes nothing: `unsafe_probability` is P(unsafe) / (P(safe) + P(unsafe)) at the forced `\\boxed{`
    and `text` is empty. `cached_tokens` of the `prompt_tokens` were not computed again (prefix reuse).
    """

    text: str
    completion_tokens: int = 0
    prompt_tokens: int = 0
    unsafe_probability: float | None = None
    truncated: bool = False
    cached_tokens: int = 0  # leading prompt tokens read from a reused key/value cache
    model: str | None = None  # the model that answered, where the server names it (telemetry)


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The chat messages of one guard call: the optional system message, then the prompt as the user's."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": prompt}]


class GuardEngineError(Exception):
    """The engine could not produce an output (server down, timeout, model failure)."""


class GuardContextExceeded(GuardEngineError):
    """The prompt does not fit the guard model's context: the screener judges the content in smaller pieces."""


@dataclass(frozen=True)
class EngineSettings:
    """The guard settings an engine is built from (proxy.yaml's `guard` section, with `auto` resolved): each
    engine's `from_settings` takes the parts it uses. `options` are the engine's own (guard.options)."""

    engine: str
    mode: str = "generate"
    url: str | None = None
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 60.0
    max_connections: int = 64
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineInfo:
    """An engine as the proxy tells it: the GenAI provider and model of its spans, the server it calls (`address`,
    "" in process), whether `start()` loads a model here (the proxy then loads it before serving and says so),
    and the per-side score thresholds its scorer was calibrated with (a verdict head's; () for none)."""

    provider: str
    model: str | None = None
    address: str = ""
    loads_model: bool = False
    score_thresholds: tuple[tuple[Side, float], ...] = ()


@runtime_checkable
class GuardCompleter(Protocol):
    """What a screen calls: one rendered guard prompt (a user message, after an optional system message) in, the
    model's output out.

    `cache_salt` names whose prompt this is for the engine's own caches (a tenant's salt): cached prompt state
    (prefix key/value caches) is reused only between calls with the same salt, so one tenant cannot learn from
    timing what another sent. `requester` groups the calls of one screen: an engine that queues calls serves
    requesters in turn, so that one request's many segments do not hold up everyone else's.
    """

    name: str

    async def complete(
        self, prompt: str, sampling: Sampling, system: str | None = None, *, cache_salt: str = "", requester: str = ""
    ) -> GuardOutput:
        """Run the guard model on `prompt` (and `system`, for families that put the policy there); raise
        GuardContextExceeded when the prompt is too long for the model, GuardEngineError when no output can be
        had otherwise."""
        ...


@runtime_checkable
class GuardEngine(GuardCompleter, Protocol):
    """A guard engine with its lifecycle: started once, asked whether it is ready, closed once."""

    info: EngineInfo

    async def start(self) -> None:
        """Load the model, or whatever else must be ready before the first call (nothing, for a served guard);
        raise GuardEngineError if it cannot be. Calling it again once started does nothing."""
        ...

    async def ready(self) -> bool:
        """True when the engine can serve a verdict now (model loaded, server reachable)."""
        ...

    async def aclose(self) -> None:
        """Release the model or connections."""
        ...


class EngineFactory(Protocol):
    """An engine class: builds its engine from the guard settings."""

    def from_settings(self, settings: EngineSettings) -> GuardEngine:
        """The engine these settings configure; ValueError for settings it cannot run with."""
        ...


def _registered(name: str) -> Any:
    """The class registered as `name`, or named by `module:Class` (imported now, so unused engines cost nothing)."""
    target = ENGINES.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown guard engine {name!r}; known: {', '.join(sorted(ENGINES))} or 'module:Class'")
    require_engine_extra(name)  # a slim install asked for the embedded model: say which extra, not a traceback
    module_name, attr = target.split(":", 1)
    return getattr(importlib.import_module(module_name), attr)


def _checked(engine: object, name: str) -> GuardEngine:
    if not isinstance(engine, GuardEngine):
        raise TypeError(f"{ENGINES.get(name, name)} does not implement GuardEngine")
    return engine


def engine_from_settings(settings: EngineSettings) -> GuardEngine:
    """The engine `settings.engine` names, built by its class's `from_settings`."""
    factory: EngineFactory = _registered(settings.engine)
    if not callable(getattr(factory, "from_settings", None)):  # a module:Class written for another contract
        raise TypeError(f"{ENGINES.get(settings.engine, settings.engine)} has no from_settings(EngineSettings)")
    return _checked(factory.from_settings(settings), settings.engine)


def load_engine(name: str, options: Mapping[str, Any]) -> GuardEngine:
    """The engine registered as `name` built with `options` as its keywords (benchmarks and tests that build
    one engine directly; the proxy uses engine_from_settings)."""
    return _checked(_registered(name)(**options), name)
