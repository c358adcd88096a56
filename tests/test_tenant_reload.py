"""proxy.yaml's tenants reload without a restart; a broken edit keeps the last good tenants serving."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import yaml

from rsafe_proxy.config import load_settings
from tests.doubles import FakeUpstream, ScriptedGuard
from tests.serving import Proxy, Servers, proxy_config, start_proxy


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def eventually(check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the reload did not happen in time"
        time.sleep(0.05)


def answers(proxy: Proxy, key: str) -> bool:
    try:
        proxy.client(api_key=key, max_retries=0).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hello"}]
        )
    except openai.AuthenticationError:
        return False
    return True


def test_tenants_reload_and_a_bad_edit_is_rejected(
    servers: Servers, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> None:
    config = proxy_config(upstream.url, guard.url, tmp_path, policy_reload_s=0.05)
    del config["base_dir"]
    config["tenants"] = [{"id": "a", "keys": [digest("sk-a")], "policy": "rsafe-default"}]
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proxy = start_proxy(servers, load_settings(path))
    assert answers(proxy, "sk-a")
    assert not answers(proxy, "sk-b")

    config["tenants"].append({"id": "b", "keys": [digest("sk-b")], "policy": "rsafe-default"})
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    eventually(lambda: answers(proxy, "sk-b"))
    assert answers(proxy, "sk-a")

    path.write_text(path.read_text(encoding="utf-8") + "\nunknown_section: 1\n", encoding="utf-8")
    with proxy.http() as http:
        eventually(lambda: "proxy.yaml" in http.get("/readyz").json()["policy_errors"])
        metrics = http.get("/metrics").text
    assert "rsafe_policy_reload_errors_total 1.0" in metrics
    assert answers(proxy, "sk-a") and answers(proxy, "sk-b")  # the last good tenants keep serving


@pytest.mark.parametrize("key", ["sk-a", "sk-b"])
def test_a_key_never_selects_a_tenant_that_is_gone(
    servers: Servers, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, key: str
) -> None:
    config = proxy_config(upstream.url, guard.url, tmp_path, policy_reload_s=0.05)
    del config["base_dir"]
    config["tenants"] = [
        {"id": "a", "keys": [digest("sk-a")], "policy": "rsafe-default"},
        {"id": "b", "keys": [digest("sk-b")], "policy": "rsafe-default"},
    ]
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proxy = start_proxy(servers, load_settings(path))
    assert answers(proxy, key)
    config["tenants"] = [tenant for tenant in config["tenants"] if tenant["id"] != key[-1]]
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    eventually(lambda: not answers(proxy, key))
