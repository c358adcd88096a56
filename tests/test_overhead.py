"""x-rsafe-overhead-ms and rsafe_overhead_seconds are the proxy's own time: a slow guard and a slow upstream
(both scripted, on loopback) make a request take a second, and neither figure may grow with them."""

from __future__ import annotations

import time

from tests.conftest import MakeProxy
from tests.doubles import ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.test_telemetry_metrics import CHAT, scrape, value

GUARD_S = 0.3
UPSTREAM_S = 0.6
# The proxy's own time per request is milliseconds; this bound is far above it on a loaded machine, and far below
# the waits (GUARD_S + UPSTREAM_S at least), so that counting any of them as overhead fails.
OWN_TIME_BOUND_S = 0.25


def _slow(upstream: FakeUpstream, guard: ScriptedGuard) -> None:
    upstream.first_byte_delay_s = UPSTREAM_S
    guard.delay_s = GUARD_S


def test_a_slow_guard_and_upstream_do_not_count_as_overhead(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    proxy = make_proxy()
    _slow(upstream, guard)
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "a slow hello"}]}
    with proxy.http() as http:
        started = time.monotonic()
        reply = http.post(CHAT, json=chat, timeout=30)
        elapsed = time.monotonic() - started
        samples = scrape(http)
    assert reply.status_code == 200
    # the input screen beside the upstream call, then the output screen: the waits alone take this long
    assert elapsed >= UPSTREAM_S + GUARD_S
    assert len(guard.calls) == 2
    assert float(reply.headers["x-rsafe-overhead-ms"]) < OWN_TIME_BOUND_S * 1000
    assert value(samples, "rsafe_overhead_seconds_count", route=CHAT) == 1
    assert value(samples, "rsafe_overhead_seconds_sum", route=CHAT) < OWN_TIME_BOUND_S


def test_a_slow_stream_does_not_count_as_overhead(
    make_proxy: MakeProxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    proxy = make_proxy()
    _slow(upstream, guard)
    upstream.token_delay_s = 0.02  # every word of the answer waits too
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "a slow stream"}], "stream": True}
    with proxy.http() as http:
        started = time.monotonic()
        with http.stream("POST", CHAT, json=chat, timeout=30) as reply:
            assert reply.status_code == 200
            overhead_at_start = float(reply.headers["x-rsafe-overhead-ms"])
            body = reply.read()
        elapsed = time.monotonic() - started
        samples = scrape(http)
    assert b"[DONE]" in body
    assert elapsed >= UPSTREAM_S + GUARD_S
    assert overhead_at_start < OWN_TIME_BOUND_S * 1000
    # observed when the stream ends: the upstream's words and the output windows' verdicts were all waits
    assert value(samples, "rsafe_overhead_seconds_count", route=CHAT) == 1
    assert value(samples, "rsafe_overhead_seconds_sum", route=CHAT) < OWN_TIME_BOUND_S
