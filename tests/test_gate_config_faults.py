"""The fault matrix of RELIABILITY.md, rows K1 and K2: the configuration changes under a running proxy (an invalid
policy edit, an invalid proxy.yaml edit), through the real proxy on loopback. The edit is rejected and reported;
the last good policy or tenants keep serving and screening. The other rows: test_gate_faults.py."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import yaml

from rsafe_proxy.config import load_settings
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.sdk import tenant_policy, user, wait_until
from tests.serving import Servers, proxy_config, start_proxy, write_policy

# -- the configuration changes under it ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "broken",
    [
        "categories: [\n",
        "categories:\n- {id: U2, name: Weapons, action: maybe}\n",
        "on_guard_error: sometimes\n",
        "",
    ],
    ids=["not YAML", "bad action", "bad on_guard_error", "empty"],
)
def test_an_invalid_policy_edit_is_rejected_and_the_last_good_version_keeps_blocking(
    make_proxy: MakeProxy, tmp_path: Path, broken: str
) -> None:
    path = write_policy(tmp_path, "strict")
    proxy = tenant_policy(make_proxy, path, policy_reload_s=0.02)
    with proxy.client(max_retries=0) as client:
        first = client.chat.completions.with_raw_response.create(model="fake-model", messages=user("hello"))
        version = first.headers["x-rsafe-policy"]
        path.write_text(f"id: strict\n{broken}", encoding="utf-8")
        with proxy.http() as http:
            assert wait_until(lambda: "strict" in json.dumps(http.get("/readyz").json().get("policy_errors")), 5)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="fake-model", messages=user(f"{UNSAFE} now"))
        assert caught.value.code == "content_filter"
        reply = client.chat.completions.with_raw_response.create(model="fake-model", messages=user("hello again"))
    assert reply.headers["x-rsafe-policy"] == version


def _rewrite(path: Path, change: Callable[[str], str]) -> None:
    path.write_text(change(path.read_text(encoding="utf-8")), encoding="utf-8")


@pytest.mark.parametrize(
    "change",
    [
        lambda text: text + "\nunknown_section: 1\n",
        lambda text: text.replace("tenants:", "tenants: [", 1),
        lambda text: re.sub(r"policy: \S+", "policy: /nonexistent/policy.yaml", text),
        lambda text: "",
    ],
    ids=["unknown section", "not YAML", "missing policy file", "empty"],
)
def test_an_invalid_proxy_yaml_edit_keeps_the_last_good_tenants(
    servers: Servers, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, change: Callable[[str], str]
) -> None:
    config = proxy_config(upstream.url, guard.url, tmp_path, policy_reload_s=0.05)
    del config["base_dir"]
    key = "sk-tenant-a"
    config["tenants"] = [
        {"id": "a", "keys": ["sha256:" + hashlib.sha256(key.encode()).hexdigest()], "policy": "rsafe-default"}
    ]
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proxy = start_proxy(servers, load_settings(path))
    with proxy.client(api_key=key, max_retries=0) as client:
        assert client.chat.completions.create(model="fake-model", messages=user("hello")).choices
        _rewrite(path, change)
        with proxy.http() as http:
            assert wait_until(lambda: "proxy.yaml" in json.dumps(http.get("/readyz").json().get("policy_errors")), 5)
        assert client.chat.completions.create(model="fake-model", messages=user("hello again")).choices
        with pytest.raises(openai.BadRequestError):  # still screened, with the last good policy
            client.chat.completions.create(model="fake-model", messages=user(UNSAFE))
