"""examples/observability/ checked against a running proxy: every metric each PromQL expression of the Grafana
dashboard and the alert rules names is in a real /metrics scrape (parsed with prometheus_client's own text
parser) after a mix of traffic, with the labels it filters and groups by; the dashboard shows every family; the
rule file has the shape Prometheus loads."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE, ScriptedGuard
from tests.serving import Proxy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "observability"
DASHBOARD = EXAMPLES / "rsafe-dashboard.json"
ALERTS = EXAMPLES / "rsafe-alerts.yaml"
CHAT = "/v1/chat/completions"
# the sample names of each family type, as the exposition format writes them
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
# labels Prometheus adds when it scrapes (the target's), and the bucket bound of a histogram
_SCRAPE_LABELS = frozenset({"instance", "job", "le"})
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_SELECTED = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*[{\[]")  # a name before a selector or a range
_DURATION = re.compile(r"^(?:\d+(?:ms|[smhdwy]))+$")


@dataclass(frozen=True)
class Family:
    """One metric family of the scrape: the sample names it may be queried by, and the labels its samples have
    (`sampled`: it has samples; a labelled family has none before its first value, so its labels are unknown)."""

    names: frozenset[str]
    labels: frozenset[str]
    sampled: bool


def _scrape(proxy: Proxy, guard: ScriptedGuard) -> dict[str, Family]:
    """/metrics after a mix of traffic: passes, a cache hit, a stream, an input and an output block, a 404, a
    guard failure."""
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
    with proxy.http() as http:
        assert http.post(CHAT, json=chat).status_code == 200
        assert http.post(CHAT, json=chat).status_code == 200
        assert http.post(CHAT, json={**chat, "stream": True}).status_code == 200
        assert http.post(CHAT, json={**chat, "messages": [{"role": "user", "content": UNSAFE}]}).status_code == 400
        answer = http.post(CHAT, json={**chat, "messages": [{"role": "user", "content": ASK_UNSAFE_ANSWER}]})
        assert answer.json()["choices"][0]["finish_reason"] == "content_filter"
        assert http.get("/v1/images/generations").status_code == 404
        guard.status = 500
        assert http.post(CHAT, json={**chat, "messages": [{"role": "user", "content": "new"}]}).status_code == 503
        text = http.get("/metrics").text
    families: dict[str, Family] = {}
    for family in text_string_to_metric_families(text):
        names = {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
        labels = {label for sample in family.samples for label in sample.labels}
        families[family.name] = Family(frozenset(names), frozenset(labels), bool(family.samples))
    return families


def _exprs(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: panel targets (rows' panels included) and template queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            # a template variable's query is a string with a call in it: label_values(...)
            if isinstance(value, str) and (key == "expr" or (key == "query" and "(" in value)):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def _check(expr: str, families: dict[str, Family]) -> set[str]:
    """The families `expr` names; fails on a metric or label the scrape does not have."""
    bare = _QUOTED.sub('""', expr.replace("$__rate_interval", "5m").replace("$__range", "1h"))
    assert bare.count("(") == bare.count(")") and bare.count("{") == bare.count("}"), expr
    by_name = {name: family for family in families.values() for name in family.names}
    used = set(re.findall(r"\brsafe_[a-z0-9_]+\b", bare))
    selected = {name for name in _SELECTED.findall(bare) if not name.startswith("$")}
    assert used, f"no rsafe metric in {expr!r}"
    assert selected <= used, f"a metric not the proxy's in {expr!r}: {selected - used}"
    unknown = used - set(by_name)
    assert not unknown, f"{expr!r} names {unknown}, not in /metrics"
    known = {by_name[name] for name in used}
    labels = set().union(*(family.labels for family in known)) | _SCRAPE_LABELS
    named = {m.split("=")[0].split("!")[0].strip() for block in _MATCHERS.findall(bare) for m in block.split(",")}
    named |= {label.strip() for block in _GROUPING.findall(bare) for label in block.split(",")}
    if match := re.match(r"label_values\(\s*\w+\s*,\s*(\w+)\s*\)", bare):
        named.add(match.group(1))
    if all(family.sampled for family in known):
        assert named - {""} <= labels, f"{expr!r} uses labels {named - labels} the metrics do not have"
    return {name for name, family in families.items() if family in known}


def test_every_metric_the_dashboard_and_alerts_query_is_exposed(proxy: Proxy, guard: ScriptedGuard) -> None:
    families = _scrape(proxy, guard)
    # prometheus_client's creation timestamps (`*_created`) come as families of their own: nothing to show
    exposed = {name for name in families if name.startswith("rsafe_") and not name.endswith("_created")}
    assert len(exposed) >= 15
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = list(_exprs(dashboard))
    assert len(exprs) >= 20
    shown: set[str] = set()
    for expr in exprs:
        shown |= _check(expr, families)
    # the dashboard shows every family the proxy exposes
    assert exposed <= shown, exposed - shown
    for rule in _alert_rules():
        _check(rule["expr"], families)


def test_the_checker_catches_a_wrong_name_or_label(proxy: Proxy, guard: ScriptedGuard) -> None:
    families = _scrape(proxy, guard)
    _check('sum by (side) (rate(rsafe_verdicts_total{action="block"}[5m]))', families)
    for wrong in (
        "rate(rsafe_requests[5m])",  # the counter's family name, not a sample name
        "rate(rsafe_guard_seconds_buckets[5m])",
        'sum by (side) (rate(rsafe_requests_total{tenant="a"}[5m]))',  # requests have no side
        "sum by (tenant) (rsafe_streams_in_flight)",  # nor have the gauges any label
        "rate(http_requests_total[5m])",
    ):
        with pytest.raises(AssertionError):
            _check(wrong, families)


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
            assert all(target["expr"] and target["refId"] for target in panel["targets"])
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("requests", "verdicts", "guard latency", "upstream latency", "overhead", "errors", "in flight",
                  "cache hit", "guard ready", "reloads"):  # fmt: skip
        assert topic in titles, topic


def test_the_alert_rules_have_the_prometheus_rule_file_shape() -> None:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(document) == {"groups"} and document["groups"]
    group_names = [group["name"] for group in document["groups"]]
    assert len(set(group_names)) == len(group_names)
    alerts: list[str] = []
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"} and isinstance(group["name"], str)
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert isinstance(rule["for"], str) and _DURATION.match(rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert all(isinstance(value, str) for value in (*rule["labels"].values(), *rule["annotations"].values()))
            assert {"summary", "description"} <= set(rule["annotations"])
            alerts.append(rule["alert"])
    assert len(set(alerts)) == len(alerts)
    assert set(alerts) == {
        "RSafeGuardNotReady",
        "RSafeGuardErrorRate",
        "RSafeUpstreamErrorRate",
        "RSafeOverheadP99High",
        "RSafeBlockRateSpike",
        "RSafePolicyReloadFailed",
        "RSafeAuditDecisionsDropped",
    }
