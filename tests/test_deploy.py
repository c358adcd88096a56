"""examples/deploy/: every Kubernetes manifest is valid against the Kubernetes schemas (offline, strict: an
unknown field fails), and the ConfigMap's proxy.yaml and policies load with the proxy's own loaders and agree
with the Deployment that mounts them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from rsafe_proxy.app import build_app
from rsafe_proxy.config import load_settings
from rsafe_proxy.policy.loading import load_policy, resolve_policy_path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "examples" / "deploy"
# the oldest Kubernetes release the major clouds still run, and the newest the validator knows
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            found.append((f"{path.name}:{document['kind']}/{document['metadata']['name']}", document))
    return found


def by_kind(kind: str, name: str) -> dict[str, Any]:
    (document,) = [doc for _, doc in documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return document


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "document"), documents(), ids=[name for name, _ in documents()])
def test_every_manifest_is_valid_kubernetes(name: str, document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


def test_the_validation_is_not_vacuous() -> None:
    deployment = by_kind("Deployment", "rsafe-proxy")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    broken = {**deployment}
    broken["spec"] = {**deployment["spec"], "replica": 3}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_the_expected_shape_is_there() -> None:
    kinds = {name.split(":", 1)[1] for name, _ in documents()}
    assert {
        "ConfigMap/rsafe-proxy-config",
        "Deployment/rsafe-proxy",
        "Service/rsafe-proxy",
        "HorizontalPodAutoscaler/rsafe-proxy",
        "Deployment/rsafe-guard",
        "Service/rsafe-guard",
    } <= kinds
    guard = by_kind("Deployment", "rsafe-guard")["spec"]["template"]["spec"]["containers"][0]
    assert guard["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--enable-prefix-caching" in guard["args"]  # adapters/vllm/serve.sh's recipe
    assert "--served-model-name=rsafe" in guard["args"]


def config_folder(tmp_path: Path) -> Path:
    """The ConfigMap's files, as the kubelet mounts them at /etc/rsafe-proxy."""
    for key, text in by_kind("ConfigMap", "rsafe-proxy-config")["data"].items():
        (tmp_path / key).write_text(text, encoding="utf-8")
    return tmp_path


def proxy_environment() -> dict[str, str]:
    """What the proxy Deployment gives the container: its literal values, and a stand-in for each Secret key."""
    container = by_kind("Deployment", "rsafe-proxy")["spec"]["template"]["spec"]["containers"][0]
    stand_ins = {"openai-base-url": "https://llm.example/v1", "audit-url": "postgresql://rsafe:pw@postgres:5432/rsafe"}
    return {
        entry["name"]: entry["value"]
        if "value" in entry
        else stand_ins.get(entry["valueFrom"]["secretKeyRef"]["key"], f"secret-{entry['name'].lower()}")
        for entry in container["env"]
    }


def test_the_configmap_loads_with_the_proxys_own_loaders(tmp_path: Path) -> None:
    folder = config_folder(tmp_path)
    env = proxy_environment()
    settings = load_settings(folder / "proxy.yaml", env=env)
    assert settings.server.workers == int(env["RSAFE_WORKERS"]) == 2
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8080)
    assert settings.guard.engine_name() == "openai" and settings.guard.url == env["RSAFE_GUARD_URL"]
    assert settings.audit.url is not None and settings.audit.url.startswith("postgresql://")
    policies = {tenant.id: load_policy(resolve_policy_path(tenant.policy, folder)) for tenant in settings.tenants}
    assert {tenant: policy.id for tenant, policy in policies.items()} == {
        "support": "support-bot",
        "internal": "rsafe-default",
    }
    build_app(settings)  # every policy loads as serve loads them
    # the served port and the probes are the ones the Deployment names
    container = by_kind("Deployment", "rsafe-proxy")["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == settings.server.port
    assert container["args"][:3] == ["serve", "--config", "/etc/rsafe-proxy/proxy.yaml"]
    assert (
        by_kind("ConfigMap", "rsafe-proxy-config")["metadata"]["name"]
        == (by_kind("Deployment", "rsafe-proxy")["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"])
    )
    grace = by_kind("Deployment", "rsafe-proxy")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.server.shutdown_grace_s + 5 + 5 < grace  # drain + streams' ending + preStop pause


def test_the_configmaps_policy_is_the_shipped_policy() -> None:
    data = by_kind("ConfigMap", "rsafe-proxy-config")["data"]
    assert data["support-bot.yaml"] == (ROOT / "policies" / "support-bot.yaml").read_text(encoding="utf-8")


def test_every_secret_key_the_manifests_name_is_in_the_readme() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    named = {
        entry["valueFrom"]["secretKeyRef"]["key"]
        for _, document in documents()
        if document["kind"] == "Deployment"
        for container in document["spec"]["template"]["spec"]["containers"]
        for entry in container.get("env", [])
        if "valueFrom" in entry
    }
    missing = {key for key in named if f"--from-literal={key}=" not in readme}
    assert not missing, f"keys of rsafe-secrets the README's kubectl command does not set: {missing}"
