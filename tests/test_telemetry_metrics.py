"""/metrics after a scripted mix of traffic, parsed with prometheus_client's own text parser: every family's
values checked."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rsafe_proxy.telemetry.metrics import Metrics
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard

CHAT = "/v1/chat/completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: httpx.Client) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the samples that have these labels (and any others)."""
    wanted = set(labels.items())
    return sum(v for (found, got), v in samples.items() if found == name and wanted <= got)


def test_metrics_after_a_mix_of_traffic(make_proxy: MakeProxy, guard: ScriptedGuard) -> None:
    proxy = make_proxy()
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
    blocked = {"model": "fake-model", "messages": [{"role": "user", "content": f"{UNSAFE} now"}]}
    with proxy.http() as http:
        deadline = time.monotonic() + 5  # the background probe, not a /readyz call, sets readiness
        while value(scrape(http), "rsafe_guard_ready") != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.post(CHAT, json=chat).status_code == 200
        assert http.post(CHAT, json=chat).status_code == 200  # the input verdict from the cache
        assert http.post(CHAT, json={**chat, "stream": True}).status_code == 200
        assert http.post(CHAT, json=blocked).status_code == 400
        assert http.get("/v1/images/generations").status_code == 404
        guard.status = 500
        assert http.post(CHAT, json={**chat, "messages": [{"role": "user", "content": "new"}]}).status_code == 503
        samples = scrape(http)

    route = {"tenant": "default", "route": "/v1/{rest:path}"}
    assert value(samples, "rsafe_requests_total", tenant="default", route=CHAT, status="200") == 3
    assert value(samples, "rsafe_requests_total", tenant="default", route=CHAT, status="400") == 1
    assert value(samples, "rsafe_requests_total", tenant="default", route=CHAT, status="503") == 1
    assert value(samples, "rsafe_requests_total", **route, status="404") == 1
    assert value(samples, "rsafe_requests_in_flight") == 1  # this scrape
    assert value(samples, "rsafe_streams_in_flight") == 0
    verdicts = {"tenant": "default", "side": "input"}
    assert value(samples, "rsafe_verdicts_total", **verdicts, verdict="safe", action="allow", category="none") == 3
    assert value(samples, "rsafe_verdicts_total", **verdicts, verdict="unsafe", action="block", category="U2") == 1
    assert value(samples, "rsafe_verdicts_total", **verdicts, verdict="unknown", action="guard_error_block",
                 category="none") == 1  # fmt: skip
    assert total(samples, "rsafe_verdicts_total", side="output", verdict="safe", action="allow") == 3
    assert value(samples, "rsafe_decisions_total", tenant="default", side="input", outcome="block") == 1
    # the same prompt three times: judged once (the stream's too is cached); the block and the failure judged
    assert value(samples, "rsafe_verdict_cache_hits_total", side="input") == 2
    assert value(samples, "rsafe_verdict_cache_misses_total", side="input") == 3
    output_judged = value(samples, "rsafe_verdict_cache_misses_total", side="output")
    assert output_judged + value(samples, "rsafe_verdict_cache_hits_total", side="output") == 3
    guard_calls = value(samples, "rsafe_guard_seconds_count", engine="openai", side="input")
    assert guard_calls == 3  # the failed screen is timed too; the cached one is not
    assert value(samples, "rsafe_guard_tokens_total", engine="openai", side="input", type="input") == 2 * 300
    assert (
        value(samples, "rsafe_guard_tokens_total", engine="openai", side="output", type="output") == output_judged * 20
    )
    assert value(samples, "rsafe_guard_seconds_count", engine="openai", side="output") == output_judged
    # parallel screening: the block and the guard failure had their upstream call opened too, then discarded
    assert total(samples, "rsafe_upstream_seconds_count", operation="chat") == 5
    assert value(samples, "rsafe_upstream_seconds_count", operation="chat", status="200") >= 3
    assert value(samples, "rsafe_upstream_seconds_count", operation="http", status="404") == 0  # a 404 of our own
    assert value(samples, "rsafe_overhead_seconds_count", route=CHAT) == 5
    assert value(samples, "rsafe_overhead_seconds_count", route="/v1/{rest:path}") == 1
    assert value(samples, "rsafe_errors_total", kind="content_filter") == 1
    assert value(samples, "rsafe_errors_total", kind="not_found") == 1
    assert value(samples, "rsafe_errors_total", kind="guard_unavailable") == 1
    assert value(samples, "rsafe_errors_total", kind="guard_error") == 1
    assert value(samples, "rsafe_policy_reload_errors_total") == 0
    assert total(samples, "rsafe_reloads_total") == 0
    assert value(samples, "rsafe_guard_ready") == 1


def test_labelled_children_are_kept_and_count_as_prometheus_clients_do() -> None:
    """Metrics keeps each labelled child once made (labels() is on the hot path): the same child comes back,
    by position or by name, every value lands in the exposition, and a wrong label count is still refused."""
    metrics = Metrics()
    first = metrics.requests.labels("team-a", "/v1/chat/completions", "200")
    assert metrics.requests.labels("team-a", "/v1/chat/completions", "200") is first
    first.inc()
    metrics.requests.labels(tenant="team-a", route="/v1/chat/completions", status="200").inc()
    metrics.requests.labels("team-b", "/v1/chat/completions", "403").inc(2)
    metrics.overhead_seconds.labels("/v1/chat/completions").observe(0.001)
    with pytest.raises(ValueError, match="label count"):
        metrics.requests.labels("team-a")
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    route = "/v1/chat/completions"
    assert value(samples, "rsafe_requests_total", tenant="team-a", route=route, status="200") == 2
    assert value(samples, "rsafe_requests_total", tenant="team-b", route=route, status="403") == 2
    assert value(samples, "rsafe_overhead_seconds_count", route=route) == 1
