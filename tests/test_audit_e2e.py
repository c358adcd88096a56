"""The audit log end to end: the proxy on loopback with the scripted guard, requests through the OpenAI SDK, the
decisions read back by `rsafe-proxy decisions` in a subprocess (with none of the upstream's variables set); the
policy texts kept at start-up and on reload; and a store that fails or hangs never failing or slowing a request."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from rsafe_proxy.audit.record import DecisionQuery
from rsafe_proxy.audit.sqlite import SqliteStore
from rsafe_proxy.logs import DECISION_LOGGER
from rsafe_proxy.policy.loading import load_policy
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE
from tests.sdk import ask, wait_until
from tests.serving import Proxy, write_policy

KEYS = {"bank": "sk-bank-key", "shop": "sk-shop-key"}


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def two_tenants(make_proxy: MakeProxy, directory: Path, **overrides: Any) -> tuple[Proxy, dict[str, Path]]:
    policies = {
        "bank": write_policy(directory, "bank-policy"),
        "shop": write_policy(directory, "shop-policy", reasoning={"capture": False}),
    }
    tenants = [{"id": tenant, "keys": [sha(KEYS[tenant])], "policy": str(path)} for tenant, path in policies.items()]
    return make_proxy(tenants=tenants, **overrides), policies


def blocked_id(client: openai.OpenAI, text: str) -> str:
    with pytest.raises(openai.BadRequestError) as blocked:
        ask(client, text)
    return blocked.value.response.headers["x-rsafe-decision-id"]


def decisions_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "RSAFE_GUARD"))}
    return subprocess.run(
        [sys.executable, "-m", "rsafe_proxy.cli", "--config", str(config), "decisions", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_the_cli_finds_a_block_by_tenant_verdict_and_id(make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy, policies = two_tenants(make_proxy, tmp_path)
    bank, shop = proxy.client(KEYS["bank"]), proxy.client(KEYS["shop"])
    answered = bank.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}]
    )
    safe_id = answered.headers["x-rsafe-decision-id"]
    bank_block = blocked_id(bank, f"{UNSAFE} how do I build it")
    shop_block = blocked_id(shop, f"{UNSAFE} and the shop")
    proxy.stop()  # the lifespan's end writes what is queued

    # a proxy.yaml whose upstream needs a variable no one set: the command reads only its audit: section
    config = tmp_path / "cli.yaml"
    config.write_text(
        yaml.safe_dump({"upstream": {"api_key": "${RSAFE_TEST_NEVER_SET}"}, "audit": {"url": str(proxy.audit_file)}}),
        encoding="utf-8",
    )
    found = decisions_cli(config, "--tenant", "bank", "--verdict", "unsafe", "--json")
    assert found.returncode == 0, found.stderr
    rows = [json.loads(line) for line in found.stdout.splitlines()]
    bank_version = load_policy(policies["bank"]).version
    assert [(row["decision_id"], row["side"], row["action"]) for row in rows] == [(bank_block, "input", "block")]
    row = rows[0]
    assert row["tenant"] == "bank" and row["categories"] == ["U2"] and row["route"] == "/v1/chat/completions"
    assert (row["policy_id"], row["policy_version"], row["engine"]) == ("bank-policy", bank_version, "openai")
    assert row["cache_hit"] is False and row["latency_ms"] > 0 and row["score"] is None
    assert UNSAFE in row["reasoning"]  # the bank's policy captures the guard's reasoning

    by_id = decisions_cli(config, "--id", safe_id, "--json")
    safe_rows = [json.loads(line) for line in by_id.stdout.splitlines()]
    assert [(row["side"], row["verdict"], row["action"], row["seq"]) for row in safe_rows] == [
        ("input", "safe", "allow", 0),
        ("output", "safe", "allow", 1),
    ]
    shop_rows = [json.loads(line) for line in decisions_cli(config, "--id", shop_block, "--json").stdout.splitlines()]
    assert [(row["tenant"], row["action"], row["reasoning"]) for row in shop_rows] == [("shop", "block", None)]

    table = decisions_cli(config, "--action", "block")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "TENANT", "SIDE"]
    assert [line.split()[3] for line in lines[1:]] == ["bank", "shop"]  # oldest first; the time has its zone
    none = decisions_cli(config, "--tenant", "bank", "--action", "rewrite")
    assert (none.returncode, none.stdout, none.stderr.strip()) == (0, "", "no decisions match")

    store = SqliteStore(proxy.audit_file)
    versions = store.policy_versions("bank")
    assert [(version.version, version.source, count) for version, count in versions] == [
        (bank_version, policies["bank"].read_text(encoding="utf-8"), 3)
    ]
    store.close()


def test_every_request_of_a_callers_trace_is_kept(make_proxy: MakeProxy, tmp_path: Path) -> None:
    # an agent's calls in one trace (W3C trace context) share the trace id, which is the decision id
    proxy, _ = two_tenants(make_proxy, tmp_path)
    bank = proxy.client(KEYS["bank"])
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    first = {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
    assert ask(bank, "hello", extra_headers=first).choices[0].message.content
    with pytest.raises(openai.BadRequestError) as blocked:
        ask(bank, f"{UNSAFE} now", extra_headers={"traceparent": f"00-{trace}-00f067aa0ba902b8-01"})
    assert blocked.value.response.headers["x-rsafe-decision-id"] == trace
    proxy.stop()
    store = SqliteStore(proxy.audit_file)
    kept = store.get(trace)
    store.close()
    assert [(record.side, record.action) for record in kept] == [
        ("input", "allow"),
        ("output", "allow"),
        ("input", "block"),
    ]


@pytest.mark.parametrize("sampler", [None, "traceidratio"])
def test_a_caller_that_asks_for_no_sampling_is_audited_all_the_same(
    make_proxy: MakeProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    sampler: str | None,
) -> None:
    # sampling decides what is exported, never what is audited: a trace flagged unsampled (flags 00), or an
    # operator's sampler that drops most traces, must not take a block out of the audit log or the decision log
    if sampler:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    proxy, _ = two_tenants(make_proxy, tmp_path)
    bank = proxy.client(KEYS["bank"])
    trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    with caplog.at_level(logging.INFO, logger=DECISION_LOGGER), pytest.raises(openai.BadRequestError) as blocked:
        ask(bank, f"{UNSAFE} unseen", extra_headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-00"})
    assert blocked.value.response.headers["x-rsafe-decision-id"] == trace
    proxy.stop()
    store = SqliteStore(proxy.audit_file)
    kept = store.get(trace)
    store.close()
    assert [(record.side, record.action) for record in kept] == [("input", "block")]
    assert [record for record in caplog.records if record.name == DECISION_LOGGER]  # the block is logged too


def test_a_policy_reload_keeps_the_new_version(make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy, policies = two_tenants(make_proxy, tmp_path, policy_reload_s=0.05)
    store = SqliteStore(proxy.audit_file)
    assert wait_until(lambda: len(store.policy_versions("bank")) == 1, 10)
    first = load_policy(policies["bank"]).version
    write_policy(tmp_path, "bank-policy", description="now with a description")
    second = load_policy(policies["bank"]).version
    assert wait_until(lambda: len(store.policy_versions("bank")) == 2, 10)
    assert [version.version for version, _ in store.policy_versions("bank")] == [second, first]
    blocked_id(proxy.client(KEYS["bank"]), f"{UNSAFE} after the edit")
    proxy.stop()
    assert [count for _, count in store.policy_versions("bank")] == [1, 0]
    assert [len(store.policy_versions("shop"))] == [1]
    store.close()


def _metric(proxy: Proxy, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{proxy.url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_a_failing_store_fails_no_request_and_is_counted(make_proxy: MakeProxy, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the audit directory should be", encoding="utf-8")
    proxy = make_proxy(audit={"url": str(blocker / "decisions.db")})
    client = proxy.client()
    for number in range(5):
        assert ask(client, f"hello {number}").choices[0].message.content
    blocked_id(client, f"{UNSAFE} still blocked")
    assert wait_until(lambda: _metric(proxy, "rsafe_audit_dropped_total", reason="store_error") == 11, 10)
    assert _metric(proxy, "rsafe_audit_written_total") == 0


def test_a_hung_store_slows_no_request(make_proxy: MakeProxy, tmp_path: Path) -> None:
    path = tmp_path / "decisions.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the file: every write waits its busy timeout (5 s)
    try:
        proxy = make_proxy(audit={"url": str(path), "queue_size": 3})
        client = proxy.client()
        slowest = 0.0
        for number in range(8):
            started = time.perf_counter()
            assert ask(client, f"hello {number}").choices[0].message.content
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 2.0  # each one far below the store's 5 s wait
        assert _metric(proxy, "rsafe_audit_dropped_total", reason="queue_full") > 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    proxy.stop()
    store = SqliteStore(path)
    written = store.count(DecisionQuery())
    store.close()
    assert 0 < written < 16  # some were written once the lock went; the overflow was not
