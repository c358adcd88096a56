"""Typed, frozen settings read from proxy.yaml, with `${VAR}` and `${VAR:-default}` interpolation."""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from rsafe_proxy.guard.engine import DEFAULT_SEGMENT_CHARS, SEGMENT_CHARS, EngineSettings, is_embedded_guard
from rsafe_proxy.guard.families import family, mode_problem
from rsafe_proxy.statedir import state_dir
from rsafe_proxy.yamlsource import FileInvalid, InvalidPart, Problem, YamlDocument, read_yaml, validate

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _none_if_empty(value: Any) -> Any:
    return None if value == "" else value


def _key_forms(keys: tuple[str, ...]) -> tuple[str, ...]:
    """Keys in proxy.yaml are `sha256:<hex digest>` or `env:VARIABLE`, never the key itself."""
    for key in keys:
        if key.startswith("sha256:"):
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", key):
                raise ValueError("a sha256 key must be 'sha256:' followed by 64 lowercase hex digits")
        elif not key.startswith("env:"):
            raise ValueError("each key must be 'sha256:<hex digest>' or 'env:VARIABLE' (never the key itself)")
    return keys


class ServerSettings(_Frozen):
    """The proxy's own HTTP behaviour."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    workers: Annotated[int, Field(ge=1, le=256)] = Field(
        1,
        description="Worker processes serving the one listening socket (`rsafe-proxy serve --workers` overrides "
        "it). Each has its own verdict cache, guard engine (the embedded model: its memory once per worker), "
        "connection pools and policy watcher; /metrics adds up every worker's figures. SIGTERM to the parent "
        "drains and stops them all.",
    )
    max_body_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    input_screening: Literal["parallel", "sequential"] = "parallel"
    # Availability: every wait on a client is bounded, so idle or trickling connections cannot pile up
    header_timeout_s: Annotated[float, Field(gt=0)] = Field(
        10.0,
        description="A connection must send a complete request head (request line and headers) within this "
        "many seconds of opening, or of the first byte of its next request; else it is closed (slowloris).",
    )
    keep_alive_timeout_s: Annotated[int, Field(ge=1)] = Field(
        20,
        description="An idle keep-alive connection is closed after this many seconds without a request. Keep it "
        "above the clients' own idle expiry (httpx and the OpenAI SDKs: 5 s), or a client can send a request on "
        "a connection the proxy is closing at that moment.",
    )
    body_idle_timeout_s: Annotated[float, Field(gt=0)] = Field(
        15.0, description="A request body that sends nothing for this many seconds is answered 408."
    )
    body_timeout_s: Annotated[float, Field(gt=0)] = Field(
        120.0, description="A request body not complete this many seconds after its headers is answered 408."
    )
    max_connections: Annotated[int, Field(ge=1)] = Field(
        4096,
        description="Open client connections served at once; a request on a connection past the cap gets a "
        "503 JSON error and the connection is closed. Lowered at start to what the open-file limit allows.",
    )
    shutdown_grace_s: Annotated[float, Field(ge=0)] = Field(
        30.0,
        description="On SIGTERM new connections are refused and requests in flight get this many seconds to "
        "finish; then streams end with an error event and unanswered requests get a 503.",
    )
    admin_keys: tuple[str, ...] = Field(
        (),
        description="Keys for /metrics and /readyz, in the forms tenant keys take ('sha256:<hex digest>' or "
        "'env:VARIABLE'). When set, those two answer only 'Authorization: Bearer <admin key>' (else 401), so "
        "that tenants cannot read each other's traffic figures or policy versions; /healthz stays open. "
        "Unset (the default), both are open. An admin key is a credential like a proxy key: never forwarded.",
    )

    _admin_key_forms = field_validator("admin_keys")(_key_forms)


class UpstreamSettings(_Frozen):
    """The OpenAI-compatible LLM behind the proxy."""

    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 600.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_connections: Annotated[int, Field(ge=1)] = 200

    _empty_key = field_validator("api_key", mode="before")(_none_if_empty)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")


class CacheSettings(_Frozen):
    """The verdict cache: (policy version, side, content) -> verdict."""

    max_entries: Annotated[int, Field(ge=0)] = 10_000
    ttl_s: Annotated[float, Field(gt=0)] = 3600.0


class GuardSettings(_Frozen):
    """The guard model and how it is called.

    engine `auto` means: the OpenAI-compatible server at `url` when one is set, else the embedded model.
    """

    engine: str = "auto"
    url: str | None = None
    model: str | None = None
    api_key: SecretStr | None = None
    mode: Literal["auto", "generate", "score"] = "auto"
    template: str | None = None
    score_threshold: Annotated[float, Field(gt=0, lt=1)] | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.8
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.05
    max_tokens: Annotated[int, Field(ge=1)] = 1024
    max_connections: Annotated[int, Field(ge=1)] = Field(
        64,
        description="Connections the openai engine keeps open to the guard server (its pool size), per worker "
        "process: guard calls beyond it wait for a free connection (within timeout_s). The guard server sees up to "
        "server.workers x replicas x this many requests at once; size its batch (vLLM --max-num-seqs) to match.",
    )
    segment_chars: Annotated[int, Field(ge=256)] | None = Field(
        None,
        description="Content longer than this many characters (after normalisation) is judged in segments, every "
        "one of them, never truncated. Unset: the engine's default (transformers 4000, openai and vllm 12000). "
        "A segment the guard model still finds too long for its context is judged in halves.",
    )
    segment_overlap_chars: Annotated[int, Field(ge=0)] = Field(
        200, description="Characters each segment shares with the next, so a phrase cut at a boundary is seen whole."
    )
    max_segments: Annotated[int, Field(ge=1)] = Field(
        64,
        description="The most guard calls one screen may make. A prompt that needs more is refused with 413 "
        "content_too_long (under on_guard_error: allow too); an answer that needs more is withheld.",
    )
    segments_in_flight: Annotated[int, Field(ge=1)] = Field(
        4, description="Guard calls of one screen run at once (the others wait): one long text cannot take the guard."
    )
    options: Mapping[str, Any] = Field(default_factory=dict)
    cache: CacheSettings = CacheSettings()

    _empty = field_validator("url", "model", "api_key", "template", mode="before")(_none_if_empty)

    @field_validator("template")
    @classmethod
    def _known_family(cls, template: str | None) -> str | None:
        if template is not None:
            family(template)  # raises ValueError naming the known families
        return template

    @model_validator(mode="after")
    def _overlap_shorter(self) -> Self:
        if self.segment_overlap_chars * 2 >= self.effective_segment_chars():
            raise InvalidPart(["segment_overlap_chars"], "must be less than half of segment_chars")
        return self

    def effective_segment_chars(self) -> int:
        """segment_chars, or the selected engine's default."""
        return self.segment_chars or SEGMENT_CHARS.get(self.engine_name(), DEFAULT_SEGMENT_CHARS)

    @model_validator(mode="after")
    def _readable_in_mode(self) -> Self:
        template = self.effective_template()
        problem = None if template is None else mode_problem(self.effective_mode(), family(template))
        if problem is not None:
            raise InvalidPart(["template"], problem)
        return self

    def engine_name(self) -> str:
        """The engine this configuration selects."""
        if self.engine != "auto":
            return self.engine
        return "openai" if self.url else "transformers"

    def embedded(self) -> bool:
        """True when the guard is the embedded model in process."""
        return is_embedded_guard(self.engine_name(), self.options)

    def effective_template(self) -> str | None:
        """The template family forced on every policy: the configured one; for the embedded model, the compact
        rendering its adapter flags fewer everyday requests with; else None (each policy's own family)."""
        if self.template:
            return self.template
        return "rsafe-compact" if self.embedded() else None

    def effective_mode(self) -> Literal["generate", "score"]:
        """`auto`: score for the embedded transformers model (a base model cannot reason), else generate."""
        if self.mode != "auto":
            return self.mode
        return "score" if self.embedded() else "generate"

    def engine_settings(self) -> EngineSettings:
        """What the selected engine is built from (`auto` resolved); each engine takes the parts it uses."""
        return EngineSettings(
            engine=self.engine_name(),
            mode=self.effective_mode(),
            url=self.url,
            model=self.model,
            api_key=self.api_key.get_secret_value() if self.api_key else None,
            timeout_s=self.timeout_s,
            max_connections=self.max_connections,
            options=self.options,
        )


class TenantUpstream(_Frozen):
    """A tenant's own upstream, replacing the global one."""

    base_url: str | None = None
    api_key: SecretStr | None = None

    _empty = field_validator("base_url", "api_key", mode="before")(_none_if_empty)


class TenantSettings(_Frozen):
    """A tenant: who it is, how its clients authenticate, which policy applies."""

    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    keys: tuple[str, ...] = ()
    anonymous: bool = False
    policy: str = "rsafe-default"
    upstream: TenantUpstream = TenantUpstream()

    _key_forms = field_validator("keys")(_key_forms)


class TelemetrySettings(_Frozen):
    """Where decisions and spans go. OTLP is configured with the standard OTEL_* variables."""

    spans_file: str | None = "rsafe-spans.jsonl"
    service_name: str = "rsafe-proxy"

    _empty = field_validator("spans_file", mode="before")(_none_if_empty)


_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class AuditSettings(_Frozen):
    """The audit log: every screening decision, kept in a database that `rsafe-proxy decisions` and the console
    read."""

    enabled: bool = Field(
        True, description="Write every decision to the audit log (off: decisions go only to the log and spans)."
    )
    url: str | None = Field(
        None,
        description="Where the audit log is: a SQLite file (a path, or sqlite:///path as SQLAlchemy writes it; a "
        "relative path is relative to proxy.yaml's directory) or a PostgreSQL database "
        "('postgresql://user:password@host:5432/db', needs the 'postgres' extra) that a fleet of proxies shares. "
        "Unset: the SQLite file decisions.db in the per-user state directory: $RSAFE_STATE_DIR, else "
        "$XDG_STATE_HOME/rsafe-proxy, else "
        "~/.local/state/rsafe-proxy (never relative to where the proxy was started).",
    )
    max_age_days: Annotated[float, Field(gt=0)] | None = Field(
        90.0, description="Decisions older than this many days are removed (checked every few minutes). Unset: kept."
    )
    max_rows: Annotated[int, Field(ge=1)] | None = Field(
        1_000_000, description="At most this many decisions are kept: the oldest beyond it are removed. Unset: all."
    )
    queue_size: Annotated[int, Field(ge=1)] = Field(
        10_000,
        description="Decisions waiting to be written (in batches, off the request path). When the store is slow or "
        "down and the queue is full, further decisions are not written, never waited for: they are counted in "
        "rsafe_audit_dropped_total and logged.",
    )

    _empty = field_validator("url", mode="before")(_none_if_empty)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str | None) -> str | None:
        scheme = _URL_SCHEME.match(url) if url else None
        if scheme and scheme.group(1).lower() not in ("sqlite", "postgres", "postgresql"):
            raise ValueError(f"must be a file path, sqlite:///path or a postgresql:// URL, not a {scheme.group(1)} URL")
        return url


class ConsoleSettings(_Frozen):
    """The web console at /console, where compliance teams read decisions and try policies. Off by default."""

    enabled: bool = Field(False, description="Serve the console at /console (off: /console is 404 like any path).")
    admin_key: str | None = Field(
        None,
        description="The key that signs in to the console and sees every tenant, in the forms tenant keys take "
        "('sha256:<hex digest>' or 'env:VARIABLE'). A console key of its own: proxy and admin keys do not sign in.",
    )
    tenant_keys: Mapping[str, str] = Field(
        default_factory=dict,
        description="Keys that see one tenant only (its decisions, policies and playground), as "
        "{key: tenant id}, each key in the forms above, e.g. {'env:RSAFE_CONSOLE_BANK_KEY': bank}.",
    )
    session_secret: SecretStr | None = Field(
        None,
        description="Signs the console's session cookies. Unset: a random secret per process, so a sign-in lasts "
        "until the proxy restarts; set it (e.g. '${RSAFE_CONSOLE_SECRET}', 32+ characters) when several workers or "
        "hosts serve the console, so that each accepts the others' sessions.",
    )
    session_ttl_s: Annotated[float, Field(gt=0)] = Field(
        8 * 3600.0, description="A sign-in lasts this many seconds; then the key is asked for again."
    )
    playground_in_flight: Annotated[int, Field(ge=1)] = Field(
        2,
        description="At most this many playground trials are screened at once, per process (each worker has its "
        "own count); one more is refused with 429, so that console keys cannot flood the guard traffic needs.",
    )

    _empty = field_validator("admin_key", "session_secret", mode="before")(_none_if_empty)

    @field_validator("admin_key")
    @classmethod
    def _admin_key_form(cls, key: str | None) -> str | None:
        return None if key is None else _key_forms((key,))[0]

    @field_validator("tenant_keys")
    @classmethod
    def _tenant_key_forms(cls, keys: Mapping[str, str]) -> Mapping[str, str]:
        _key_forms(tuple(keys))
        return keys

    @field_validator("session_secret")
    @classmethod
    def _long_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (it signs sign-in cookies)")
        return secret

    @model_validator(mode="after")
    def _someone_signs_in(self) -> Self:
        if self.enabled and self.admin_key is None and not self.tenant_keys:
            raise ValueError("an enabled console needs admin_key or tenant_keys: no one could sign in")
        return self


class Settings(_Frozen):
    """Everything proxy.yaml holds."""

    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    guard: GuardSettings = GuardSettings()
    tenants: Annotated[tuple[TenantSettings, ...], Field(min_length=1)] = (
        TenantSettings(id="default", anonymous=True),
    )
    telemetry: TelemetrySettings = TelemetrySettings()
    audit: AuditSettings = AuditSettings()
    console: ConsoleSettings = ConsoleSettings()
    policy_reload_s: Annotated[float, Field(ge=0)] = 2.0
    base_dir: str = "."
    source: str | None = None  # the file these settings came from (set by load_settings; watched for tenants)

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, tenants: tuple[TenantSettings, ...]) -> tuple[TenantSettings, ...]:
        ids = [tenant.id for tenant in tenants]
        if len(set(ids)) != len(ids):
            raise ValueError("tenant ids must be unique")
        if sum(tenant.anonymous for tenant in tenants) > 1:
            raise ValueError("at most one tenant may be anonymous")
        return tenants

    @model_validator(mode="after")
    def _console_tenants_known(self) -> Self:
        known = {tenant.id for tenant in self.tenants}
        for key, tenant in self.console.tenant_keys.items():
            if tenant not in known:
                raise InvalidPart(["console", "tenant_keys", key], f"{tenant!r} is not one of the tenants")
        return self


def _interpolate(
    document: YamlDocument, value: Any, env: Mapping[str, str], path: tuple[str | int, ...], problems: list[Problem]
) -> Any:
    if isinstance(value, dict):
        return {key: _interpolate(document, item, env, (*path, key), problems) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(document, item, env, (*path, index), problems) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, has_default, default = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if has_default is not None:
            return default or ""
        message = f"environment variable {name} is not set (or is empty)"
        problems.append(Problem(document.path, document.line_of(path), message))
        return ""

    return _VARIABLE.sub(substitute, value)


def packaged_config_path() -> Path:
    """The default proxy.yaml shipped with the package."""
    return Path(str(resources.files("rsafe_proxy").joinpath("proxy.yaml")))


def load_settings(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, sections: Collection[str] | None = None
) -> Settings:
    """Settings from `path` (default: ./proxy.yaml, else the packaged default); raises FileInvalid.

    With `sections`, only those top-level sections are read (and their variables needed): the others keep their
    defaults. A command that reads the audit log needs no upstream or guard variables."""
    if path is None:
        path = Path("proxy.yaml") if Path("proxy.yaml").is_file() else packaged_config_path()
    document = read_yaml(path)
    problems: list[Problem] = []
    raw = document.data
    if sections is not None and isinstance(raw, dict):
        raw = {key: value for key, value in raw.items() if key in sections}
    data = _interpolate(document, raw, os.environ if env is None else env, (), problems)
    if problems:
        raise FileInvalid(problems)
    if isinstance(data, dict):
        # the packaged file's relative paths (its spans file) land in the user's state folder: the package's own
        # folder may be read-only, and is no place for a deployment's data
        packaged = Path(path).resolve() == packaged_config_path().resolve()
        data.setdefault("base_dir", str(state_dir(env) if packaged else Path(path).resolve().parent))
        data.setdefault("source", str(Path(path).resolve()))
    return validate(YamlDocument(document.path, data, document.lines), Settings)
