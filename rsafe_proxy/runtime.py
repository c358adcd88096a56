"""Everything one running proxy holds: settings, clients, engine, policies, pipeline. Built by the app's
lifespan and closed by it; nothing lives at module level."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rsafe_proxy.audit import open_store
from rsafe_proxy.audit.record import DecisionStore, PolicyVersion
from rsafe_proxy.audit.spans import AuditSpans
from rsafe_proxy.audit.writer import AuditWriter, Retention
from rsafe_proxy.config import GuardSettings, Settings, load_settings
from rsafe_proxy.draining import Drain
from rsafe_proxy.guard.cache import TTLCache
from rsafe_proxy.guard.embedded import head_folder
from rsafe_proxy.guard.engine import GuardEngine, Sampling, load_engine
from rsafe_proxy.guard.head import HeadInfo
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.guard.screen import Screener, ScreenSettings, Verdict
from rsafe_proxy.logs import DecisionLog
from rsafe_proxy.pipeline import Pipeline
from rsafe_proxy.policy.loading import resolve_policy_path
from rsafe_proxy.policy.store import PolicyStore
from rsafe_proxy.policy.tenants import TenantDirectory
from rsafe_proxy.telemetry import Recorder
from rsafe_proxy.telemetry.genai import TracedEngine
from rsafe_proxy.upstream import Upstream
from rsafe_proxy.yamlsource import FileInvalid

log = logging.getLogger("rsafe_proxy")

GUARD_PROBE_S = 5.0  # how often rsafe_guard_ready is refreshed


def _stamp(path: str | None) -> tuple[int, int] | None:
    try:
        stat = os.stat(path) if path else None
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size) if stat else None


def engine_options(guard: GuardSettings) -> dict[str, Any]:
    """The keyword options the selected engine is built with."""
    name = guard.engine_name()
    if name == "openai":
        if not guard.url:
            raise ValueError("guard.url (RSAFE_GUARD_URL) is required by the openai guard engine")
        return {
            "url": guard.url,
            "model": guard.model or "rsafe",
            "api_key": guard.api_key.get_secret_value() if guard.api_key else None,
            "timeout_s": guard.timeout_s,
            "max_connections": guard.max_connections,
        }
    return {**guard.options, "mode": guard.effective_mode()}


def build_engine(guard: GuardSettings) -> GuardEngine:
    """The guard engine the settings select (imported lazily)."""
    return load_engine(guard.engine_name(), engine_options(guard))


def head_thresholds(guard: GuardSettings) -> tuple[tuple[Side, float], ...]:
    """The per-side thresholds of the transformers engine's verdict head (none when `score_threshold` is set, or
    for other engines, or without a head)."""
    if guard.score_threshold is not None or guard.engine_name() != "transformers":
        return ()
    model, adapter = guard.options.get("model", "embedded"), guard.options.get("adapter", "auto")
    folder = head_folder(str(model), None if adapter is None else str(adapter))
    info = HeadInfo.read(folder) if folder is not None else None
    return () if info is None else tuple((Side(side), value) for side, value in info.thresholds.items())


def build_screener(guard: GuardSettings, engine: GuardEngine) -> Screener:
    """A screener over `engine` with the settings' sampling, timeout and cache."""
    sampling = Sampling(guard.temperature, guard.top_p, guard.repetition_penalty, guard.max_tokens)
    settings = ScreenSettings(
        guard.effective_mode(),
        guard.effective_template(),
        0.5 if guard.score_threshold is None else guard.score_threshold,
        guard.timeout_s,
        sampling,
        segment_chars=guard.effective_segment_chars(),
        overlap_chars=guard.segment_overlap_chars,
        max_segments=guard.max_segments,
        segments_in_flight=guard.segments_in_flight,
        score_thresholds=head_thresholds(guard),
    )
    cache: TTLCache[Verdict] = TTLCache(guard.cache.max_entries, guard.cache.ttl_s)
    return Screener(engine, settings, cache)


def traced_engine(guard: GuardSettings, engine: GuardEngine, recorder: Recorder) -> TracedEngine:
    """`engine` making a GenAI client span of each guard call: the provider is `openai` for an OpenAI-compatible
    guard server, the engine's name for an embedded model (no server address then)."""
    if guard.engine_name() == "openai":
        return TracedEngine(engine, recorder.tracer, "openai", guard.model or "rsafe", guard.url or "")
    model = guard.options.get("model")
    return TracedEngine(engine, recorder.tracer, engine.name, model if isinstance(model, str) else None, "")


def guard_description(guard: GuardSettings) -> str:
    """The guard in a few words for the log: engine, model, mode (and where, for a served guard)."""
    name = guard.engine_name()
    if name == "openai":
        return f"engine openai, model {guard.model or 'rsafe'} at {guard.url}, mode {guard.effective_mode()}"
    model = guard.options.get("model", "embedded")
    return f"engine {name}, model {model}, mode {guard.effective_mode()}"


EMBEDDED_NOTICE = (
    "guard: the embedded model is in use (Gemma 3 270M on CPU, no server needed): it catches plain harmful "
    "requests and answers and lets most everyday chat through, but it misses subtle harm and judges every "
    "policy by general harm rather than by its own categories. For production, serve a 7B+ guard and set "
    "RSAFE_GUARD_URL. Figures and limits: README, 'The embedded default model'."
)


def guard_notice(guard: GuardSettings) -> str | None:
    """The one-line notice `serve` logs when the embedded guard judges (None for any other guard)."""
    return EMBEDDED_NOTICE if guard.embedded() else None


def start_audit(settings: Settings, recorder: Recorder) -> AuditWriter | None:
    """The audit log's writer (started), fed by the screen spans; None when `audit.enabled` is off."""
    audit = settings.audit
    if not audit.enabled:
        return None
    store = open_store(audit, settings.base_dir)
    retention = Retention(audit.max_age_days * 86_400 if audit.max_age_days else None, audit.max_rows)
    writer = AuditWriter(store, counters=recorder.metrics.audit, max_queue=audit.queue_size, retention=retention)
    recorder.provider.add_span_processor(AuditSpans(writer.submit))
    log.info("audit log: %s", getattr(store, "location", type(store).__name__))
    return writer.start()


def policy_paths(settings: Settings) -> dict[str, Path]:
    """Each tenant's policy file."""
    base = Path(settings.base_dir)
    return {tenant.id: resolve_policy_path(tenant.policy, base) for tenant in settings.tenants}


@dataclass
class Runtime:
    """The live parts of one proxy."""

    settings: Settings
    policies: PolicyStore
    tenants: TenantDirectory
    recorder: Recorder
    engine: GuardEngine
    client: httpx.AsyncClient
    pipeline: Pipeline
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    config_error: str | None = None
    drain: Drain = field(default_factory=Drain)  # begun by the server at shutdown (rsafe_proxy.server)
    upstream_error: str | None = None  # why the last upstream check failed (None: it answered, or none ran yet)
    upstream_checked: float = -math.inf  # when it ran (monotonic)
    # the audit log (decisions, policy texts) that the console reads, None when audit.enabled is off; its calls
    # block: make them from a worker thread. Written by audit_writer, off the request path.
    audit: DecisionStore | None = None
    audit_writer: AuditWriter | None = None

    @property
    def engine_name(self) -> str:
        return self.engine.name

    @classmethod
    def start(cls, settings: Settings, policies: PolicyStore, env: Mapping[str, str] | None = None) -> Runtime:
        """Build the runtime; the engine loads its model in the background (see /readyz)."""
        recorder = Recorder(settings.telemetry, settings.base_dir)
        engine = build_engine(settings.guard)
        upstream_settings = settings.upstream
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(upstream_settings.timeout_s, connect=upstream_settings.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=upstream_settings.max_connections,
                max_keepalive_connections=upstream_settings.max_connections,
            ),
        )
        key = upstream_settings.api_key.get_secret_value() if upstream_settings.api_key else None
        pipeline = Pipeline(
            build_screener(settings.guard, traced_engine(settings.guard, engine, recorder)),
            Upstream(client, upstream_settings.base_url),
            recorder,
            engine.name,
            parallel=settings.server.input_screening == "parallel",
            upstream_api_key=key,
        )
        tenants = TenantDirectory(settings.tenants, os.environ if env is None else env)
        for name in tenants.missing_env:
            log.warning("tenant key variable %s is not set: that key cannot be used", name)
        runtime = cls(settings, policies, tenants, recorder, engine, client, pipeline)
        recorder.provider.add_span_processor(DecisionLog())  # one log line per block, rewrite or flag
        runtime.audit_writer = start_audit(settings, recorder)
        runtime.audit = runtime.audit_writer.store if runtime.audit_writer is not None else None
        runtime.record_policies(tenant.id for tenant in settings.tenants)
        runtime.tasks.append(asyncio.create_task(runtime.check_upstream(announce=True)))
        if getattr(engine, "start", None) is None:
            log.info("guard: %s (served elsewhere: /readyz tells when it answers)", guard_description(settings.guard))
        if (notice := guard_notice(settings.guard)) is not None:
            log.info(notice)
        if settings.policy_reload_s > 0:
            runtime.tasks.append(asyncio.create_task(runtime._watch_policies()))
        if getattr(engine, "start", None) is not None:
            runtime.tasks.append(asyncio.create_task(runtime._warm()))
        runtime.tasks.append(asyncio.create_task(runtime._probe_guard()))
        return runtime

    async def _probe_guard(self) -> None:
        """Keep rsafe_guard_ready live: the engine's readiness, asked every GUARD_PROBE_S seconds."""
        while True:
            await self.guard_ready()
            await asyncio.sleep(GUARD_PROBE_S)

    async def _warm(self) -> None:
        """Load the guard model now rather than on the first request; /readyz tells when it is done."""
        start = getattr(self.engine, "start", None)
        description = guard_description(self.settings.guard)
        log.info("guard loading: %s (requests wait until it is ready; /readyz is 503 until then)", description)
        started = time.perf_counter()
        try:
            if start is not None:
                await start()
        except Exception as error:  # the failure is served as 'not ready' and retried on the next request
            log.error("the guard engine could not start: %s", error)
            return
        log.info("guard ready: %s, loaded in %.1f s", description, time.perf_counter() - started)

    async def check_upstream(self, announce: bool = False, max_age_s: float = 0.0) -> None:
        """Connect to the upstream once (unless that was done less than `max_age_s` ago) and keep the outcome in
        `upstream_error` (None: it can be reached). A failure is a warning, never a refusal to start: the
        upstream may come up later. `announce` logs the outcome (start-up)."""
        if time.monotonic() - self.upstream_checked < max_age_s:
            return
        upstream = self.settings.upstream
        error = await Upstream(self.client, upstream.base_url).probe(upstream.connect_timeout_s)
        self.upstream_error, self.upstream_checked = error, time.monotonic()
        if announce and error is not None:
            log.warning("upstream %s cannot be reached: %s; requests fail until it can", upstream.base_url, error)
        elif announce:
            log.info("upstream %s can be reached", upstream.base_url)

    async def _watch_policies(self) -> None:
        stamp = _stamp(self.settings.source)
        while True:
            await asyncio.sleep(self.settings.policy_reload_s)
            current = _stamp(self.settings.source)
            if current != stamp:
                stamp = current
                await asyncio.to_thread(self._reload_tenants)
            before = self.policies.reload_errors
            replaced = await asyncio.to_thread(self.policies.reload_changed)
            if self.policies.reload_errors > before:
                self.recorder.metrics.reload_failed(self.policies.reload_errors - before)
            if replaced:
                self.recorder.metrics.reloads.labels("ok").inc(len(replaced))
                await asyncio.to_thread(self.record_policies, replaced)

    def _reload_tenants(self) -> None:
        """proxy.yaml changed: take its tenants (keys, policies, upstream overrides) if the whole file is valid.

        Other sections (server, upstream, guard, telemetry) need a restart. A request in flight keeps the
        tenant and policy it started with; a bad edit keeps the last good tenants serving."""
        if self.settings.source is None:
            return
        try:
            settings = load_settings(self.settings.source)
            policies = PolicyStore.load(policy_paths(settings))
            tenants = TenantDirectory(settings.tenants, os.environ)
        except (FileInvalid, ValueError) as error:
            self.config_error = str(error)
            self.recorder.metrics.reload_failed()
            log.error("proxy.yaml edit rejected, the last good tenants keep serving:\n%s", error)
            return
        self.config_error = None
        self.tenants, self.policies = tenants, policies
        self.record_policies(tenant.id for tenant in settings.tenants)
        self.recorder.metrics.reloads.labels("ok").inc()
        log.info("tenants reloaded from %s: %s", self.settings.source, ", ".join(t.id for t in settings.tenants))

    def record_policies(self, tenants: Iterable[str]) -> None:
        """Keep the policy text now in force for each of `tenants` in the audit log (once per version)."""
        if self.audit_writer is None:
            return
        for tenant in tenants:
            entry = self.policies.entries.get(tenant)
            if entry is None:
                continue
            try:
                source = entry.path.read_text(encoding="utf-8")
            except OSError as error:
                source = f"# the policy file could not be read: {error}"
            policy = entry.policy
            self.audit_writer.submit_policy(PolicyVersion(tenant, policy.id, policy.version, time.time(), source))

    async def guard_ready(self) -> bool:
        """True when the engine can answer now."""
        try:
            ready = await asyncio.wait_for(self.engine.ready(), timeout=5)
        except Exception:  # a readiness probe must answer, whatever the engine does
            ready = False
        self.recorder.metrics.guard_ready.set(1 if ready else 0)
        return ready

    async def close(self) -> None:
        """Stop background work and release every resource."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.engine.aclose()
        await self.client.aclose()
        self.recorder.shutdown()  # every span ended: every decision is queued
        if self.audit_writer is not None:
            await asyncio.to_thread(self.audit_writer.close)  # what is queued is written
