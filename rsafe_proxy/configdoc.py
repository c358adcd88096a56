"""docs/configuration.md, generated from the Settings model: every proxy.yaml key with its type, default and
meaning. `python -m rsafe_proxy.configdoc > docs/configuration.md` writes it; tests/test_first_hour.py fails
when the file and the model differ, or when a key has no meaning written down.

A key's meaning is its Field description in rsafe_proxy/config.py; keys declared without one are explained
in `MEANINGS` here (so that the settings module need not be reworded to be documented)."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from rsafe_proxy.config import Settings

MEANINGS: Mapping[str, str] = {
    "server": "The proxy's own HTTP server.",
    "server.host": "Address to listen on (`rsafe-proxy serve --host` overrides it).",
    "server.port": "Port to listen on (`--port` overrides it). Bound before anything loads: a port in use "
    "stops start-up at once.",
    "server.max_body_bytes": "Largest request body accepted; a larger one gets 413.",
    "server.input_screening": "`parallel`: the upstream call starts with the input screen and nothing is "
    "released before the verdict (the provider sees every prompt, blocked ones included); `sequential`: a "
    "prompt reaches the upstream only once judged safe.",
    "upstream": "The OpenAI-compatible LLM behind the proxy.",
    "upstream.base_url": "Its base URL, ending before the route (`.../v1`). Checked once at start-up (a "
    "warning when it cannot be reached) and by /readyz.",
    "upstream.api_key": "The key sent upstream. Unset: in anonymous (drop-in) mode the client's own "
    "Authorization header is passed on.",
    "upstream.timeout_s": "How long an upstream answer may take, between bytes of a stream included.",
    "upstream.connect_timeout_s": "How long connecting to the upstream may take.",
    "upstream.max_connections": "Connections kept open to the upstream (the pool size), per worker process; "
    "requests beyond it wait for a free connection.",
    "guard": "The guard model and how it is called.",
    "guard.engine": "`auto` (the openai engine when `url` is set, else the embedded transformers model), "
    "`openai`, `transformers`, `vllm`, or `module:Class` (a class whose `from_settings(EngineSettings)` builds a "
    "GuardEngine: rsafe_proxy.guard.engine).",
    "guard.url": "An OpenAI-compatible guard server (e.g. `vllm serve`), ending in `/v1`.",
    "guard.model": "The model name the guard server serves.",
    "guard.api_key": "The key sent to the guard server.",
    "guard.mode": "`generate`: the guard reasons, then answers; `score`: P(unsafe) from one forward pass; "
    "`auto`: score for the embedded model, generate otherwise.",
    "guard.template": "The prompt template family forced on every policy (unset: rsafe-compact for the "
    "embedded model, else each policy's own).",
    "guard.score_threshold": "In score mode, P(unsafe) at or above this is unsafe, on both sides. Unset: the "
    "thresholds a verdict head beside the transformers engine's adapter or model was calibrated with (the "
    "embedded guard has one per side), else 0.5. A policy's `guard.score_threshold` overrides it.",
    "guard.timeout_s": "How long one guard call may take; past it the verdict is unknown (the policy's "
    "`on_guard_error` decides).",
    "guard.temperature": "Sampling temperature in generate mode.",
    "guard.top_p": "Nucleus sampling in generate mode.",
    "guard.repetition_penalty": "Repetition penalty in generate mode.",
    "guard.max_tokens": "Most tokens the guard may generate per verdict.",
    "guard.options": "Options passed to the engine as they are (transformers: `model`, `adapter`, `device`, "
    "`dtype`, `threads`, `max_batch`, `prefix_cache`...).",
    "guard.cache": "The verdict cache: (tenant, policy version, side, content) -> verdict.",
    "guard.cache.max_entries": "Verdicts kept; 0 turns the cache off.",
    "guard.cache.ttl_s": "How long a verdict is kept.",
    "tenants": "Who may use the proxy, how they authenticate and which policy applies (at least one).",
    "tenants[].id": "The tenant's name, recorded on every decision.",
    "tenants[].keys": "Its proxy keys, each `sha256:<hex digest>` or `env:VARIABLE` (never the key itself).",
    "tenants[].anonymous": "Requests without a proxy key belong to this tenant (at most one).",
    "tenants[].policy": "A packaged policy name (`rsafe-default`) or the path of a policy YAML file "
    "(relative to `base_dir`).",
    "tenants[].upstream": "The tenant's own upstream, replacing the global one.",
    "tenants[].upstream.base_url": "Its base URL.",
    "tenants[].upstream.api_key": "Its key.",
    "telemetry": "Where spans go (OTLP is configured with the standard OTEL_* variables).",
    "telemetry.spans_file": "Spans as JSON lines, the telemetry export (a relative path is relative to proxy.yaml's "
    "directory); empty: none written. Decisions are read from the audit log (`audit`).",
    "audit": "The audit log: every decision (and every policy text that judged), read by `rsafe-proxy decisions` "
    "and the console.",
    "telemetry.service_name": "The OpenTelemetry service name.",
    "console": "The web console at /console (decisions, tenants, policy versions, a playground); off by default. "
    "Read at start: a change needs a restart.",
    "policy_reload_s": "How often policy files and proxy.yaml's tenants are checked for edits; an edit is read "
    "once it is unchanged for one check (within two periods); 0: never.",
    "base_dir": "Relative paths (policies, spans file) are read from here; default: the folder of proxy.yaml.",
}

# Set by the loader, never written in proxy.yaml.
_INTERNAL = frozenset({"source"})


def _type_name(annotation: Any) -> str:
    """A field's type in words: `int`, `string or null`, `list of tenant`..."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, SecretStr):
        return "secret string"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "`{}`"
    value = field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
        return f"`{json.dumps([item.model_dump(mode='json', exclude_defaults=True) for item in value])}`"
    return "null" if value is None else f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"


def _section(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (itself, or the items of a list of them), if any."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is typing.Annotated:
            return _section(typing.get_args(candidate)[0])
        if typing.get_origin(candidate) is tuple:
            return _section(typing.get_args(candidate)[0])
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def keys(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every proxy.yaml key, sections first then their keys, in model order."""
    for name, field in model.model_fields.items():
        if not prefix and name in _INTERNAL:
            continue
        key = f"{prefix}{name}"
        section = _section(field.annotation)
        is_list = typing.get_origin(field.annotation) is tuple or "tuple[" in str(field.annotation)
        meaning = (field.description or MEANINGS.get(key, "")).replace("\n", " ")
        yield key, _type_name(field.annotation), _default(field), meaning
        if section is not None:
            yield from keys(section, f"{key}[]." if is_list else f"{key}.")


def render() -> str:
    """The whole of docs/configuration.md."""
    lines = [
        "# Configuration reference: proxy.yaml",
        "",
        "<!-- Generated from rsafe_proxy/config.py by `python -m rsafe_proxy.configdoc > docs/configuration.md`;"
        " a test fails when they differ. -->",
        "",
        "`rsafe-proxy` reads `--config PATH`, else `./proxy.yaml`, else the packaged default "
        "(`rsafe_proxy/proxy.yaml`, which reads `OPENAI_BASE_URL`, `OPENAI_API_KEY` and `RSAFE_GUARD_*`). Any "
        "value may be `${VARIABLE}` or `${VARIABLE:-default}`. Unknown keys are errors, reported with their line.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, kind, default, meaning in keys():
        cell = meaning.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | {default} | {cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
