"""Everything one running proxy holds: settings, clients, engine, tenancy (tenants and policies), pipeline. Built
by the app's lifespan and closed by it; nothing lives at module level."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rsafe_proxy import http_client
from rsafe_proxy.audit import open_store
from rsafe_proxy.audit.record import DecisionStore, PolicyVersion
from rsafe_proxy.audit.spans import AuditSpans
from rsafe_proxy.audit.writer import AuditWriter, Retention
from rsafe_proxy.config import GuardSettings, Settings
from rsafe_proxy.draining import Drain
from rsafe_proxy.guard.cache import TTLCache
from rsafe_proxy.guard.engine import GuardEngine, Sampling, engine_from_settings
from rsafe_proxy.guard.screen import Screener, ScreenSettings, Verdict
from rsafe_proxy.logs import DecisionLog
from rsafe_proxy.pipeline import Pipeline
from rsafe_proxy.policy.store import PolicyStore
from rsafe_proxy.policy.tenancy import Tenancy, TenancyReload, TenancyWatch
from rsafe_proxy.policy.tenants import TenantDirectory
from rsafe_proxy.telemetry import Recorder
from rsafe_proxy.telemetry.genai import TracedEngine
from rsafe_proxy.upstream import Upstream

log = logging.getLogger("rsafe_proxy")

GUARD_PROBE_S = 5.0  # how often rsafe_guard_ready is refreshed


def build_engine(guard: GuardSettings) -> GuardEngine:
    """The guard engine the settings select, built by its class from them (imported lazily)."""
    return engine_from_settings(guard.engine_settings())


def build_screener(guard: GuardSettings, engine: GuardEngine, recorder: Recorder | None = None) -> Screener:
    """A screener over `engine` with the settings' sampling, timeout and cache; with `recorder`, each guard call
    is a GenAI client span (a verdict from the cache makes none). A configured `score_threshold` overrides the
    thresholds the engine's scorer was calibrated with."""
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
        score_thresholds=engine.info.score_thresholds if guard.score_threshold is None else (),
    )
    cache: TTLCache[Verdict] = TTLCache(guard.cache.max_entries, guard.cache.ttl_s)
    info = engine.info
    calls = (
        engine if recorder is None else TracedEngine(engine, recorder.tracer, info.provider, info.model, info.address)
    )
    return Screener(calls, settings, cache)


def guard_description(guard: GuardSettings, engine: GuardEngine) -> str:
    """The guard in a few words for the log: engine, model, where (for a served guard), mode."""
    info = engine.info
    model = f", model {info.model}" if info.model else ""
    where = f" at {info.address}" if info.address else ""
    return f"engine {guard.engine_name()}{model}{where}, mode {guard.effective_mode()}"


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


@dataclass
class Runtime:
    """The live parts of one proxy."""

    settings: Settings
    # the tenants and their policies, replaced whole by a reload: read it once per request and keep that value
    tenancy: Tenancy
    recorder: Recorder
    engine: GuardEngine
    client: http_client.HttpClient
    pipeline: Pipeline
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
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
        client = http_client.HttpClient(
            upstream_settings.max_connections,
            http_client.Timeouts(upstream_settings.timeout_s, upstream_settings.connect_timeout_s),
        )
        key = upstream_settings.api_key.get_secret_value() if upstream_settings.api_key else None
        pipeline = Pipeline(
            build_screener(settings.guard, engine, recorder),
            Upstream(client, upstream_settings.base_url),
            recorder,
            engine.name,
            parallel=settings.server.input_screening == "parallel",
            upstream_api_key=key,
        )
        env = os.environ if env is None else env
        tenants = TenantDirectory(settings.tenants, env)
        for name in tenants.missing_env:
            log.warning("tenant key variable %s is not set: that key cannot be used", name)
        runtime = cls(settings, Tenancy(tenants, policies), recorder, engine, client, pipeline)
        recorder.provider.add_span_processor(DecisionLog())  # one log line per block, rewrite or flag
        runtime.audit_writer = start_audit(settings, recorder)
        runtime.audit = runtime.audit_writer.store if runtime.audit_writer is not None else None
        runtime.record_policies(tenant.id for tenant in settings.tenants)
        runtime.tasks.append(asyncio.create_task(runtime.check_upstream(announce=True)))
        if not engine.info.loads_model:
            description = guard_description(settings.guard, engine)
            log.info("guard: %s (served elsewhere: /readyz tells when it answers)", description)
        if (notice := guard_notice(settings.guard)) is not None:
            log.info(notice)
        if settings.policy_reload_s > 0:
            watch = TenancyWatch(settings.source, runtime.tenancy, env)
            runtime.tasks.append(asyncio.create_task(runtime._watch_tenancy(watch)))
        if engine.info.loads_model:
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
        description = guard_description(self.settings.guard, self.engine)
        log.info("guard loading: %s (requests wait until it is ready; /readyz is 503 until then)", description)
        started = time.perf_counter()
        try:
            await self.engine.start()
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

    async def _watch_tenancy(self, watch: TenancyWatch) -> None:
        """Every policy_reload_s, take the settled edits of proxy.yaml and the policy files: one assignment."""
        while True:
            await asyncio.sleep(self.settings.policy_reload_s)
            reload = await asyncio.to_thread(watch.poll, self.tenancy)
            if reload is not None:
                self.tenancy = reload.tenancy
                await asyncio.to_thread(self._count, reload)

    def _count(self, reload: TenancyReload) -> None:
        """The reload in the metrics, and its new policies in the audit log."""
        if reload.rejected:
            self.recorder.metrics.reload_failed(reload.rejected)
        if reload.reloaded:
            self.recorder.metrics.reloads.labels("ok").inc(reload.reloaded)
        self.record_policies(reload.replaced)

    def record_policies(self, tenants: Iterable[str]) -> None:
        """Keep the policy text now in force for each of `tenants` in the audit log (once per version)."""
        if self.audit_writer is None:
            return
        for tenant in tenants:
            entry = self.tenancy.policies.entries.get(tenant)
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
