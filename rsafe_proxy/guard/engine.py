"""The one small interface every guard engine implements, and the registry that picks one by name."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

ENGINES: Mapping[str, str] = {
    "openai": "rsafe_proxy.guard.engines.openai:OpenAIEngine",
    "transformers": "rsafe_proxy.guard.engines.transformers:TransformersEngine",
    "vllm": "rsafe_proxy.guard.engines.vllm:VLLMEngine",
}
# Characters of content per guard call, by engine: the embedded model on a CPU judges shorter segments (each
# costs it about a second, and others queue behind it); a server-hosted guard has the room and the speed.
SEGMENT_CHARS: Mapping[str, int] = {"openai": 12_000, "transformers": 4_000, "vllm": 12_000}
DEFAULT_SEGMENT_CHARS = 8_000


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


@runtime_checkable
class GuardEngine(Protocol):
    """Turns one rendered guard prompt (a user message, after an optional system message) into the model's output.

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

    async def ready(self) -> bool:
        """True when the engine can serve a verdict now (model loaded, server reachable)."""
        ...

    async def aclose(self) -> None:
        """Release the model or connections."""
        ...


def load_engine(name: str, options: Mapping[str, Any]) -> GuardEngine:
    """Build the engine registered as `name` (imported lazily, so unused engines cost nothing)."""
    target = ENGINES.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown guard engine {name!r}; known: {', '.join(sorted(ENGINES))} or 'module:Class'")
    module_name, attr = target.split(":", 1)
    factory = getattr(importlib.import_module(module_name), attr)
    engine = factory(**options)
    if not isinstance(engine, GuardEngine):
        raise TypeError(f"{target} does not implement GuardEngine")
    return engine
