"""A console page reads the tenancy (tenants and policies) once, when its request begins: a proxy.yaml reload
that lands while the page awaits a guard call still leaves it one snapshot, like a proxied request's."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from rsafe_proxy.config import load_settings
from tests.console_site import ADMIN_KEY, Site, csrf_of, sha, signed_in
from tests.doubles import ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Servers, proxy_config, start_proxy, write_policy


def test_a_playground_page_shows_the_tenancy_its_request_began_with(
    servers: Servers, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> None:
    for tenant in ("bank", "shop"):
        write_policy(tmp_path, f"{tenant}-policy")
    config = proxy_config(upstream.url, guard.url, tmp_path, policy_reload_s=0.05)
    del config["base_dir"]  # beside proxy.yaml, which is watched
    config["tenants"] = [
        {"id": tenant, "keys": [sha(f"sk-{tenant}-0123456789")], "policy": f"{tenant}-policy.yaml"}
        for tenant in ("bank", "shop")
    ]
    config["console"] = {"enabled": True, "admin_key": sha(ADMIN_KEY)}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proxy = start_proxy(servers, load_settings(path))
    site = Site(proxy, tmp_path / "decisions.db")
    guard.delay_s = 2.0  # the trial's guard call outlasts the reload below
    with signed_in(site, ADMIN_KEY) as http, ThreadPoolExecutor(1) as pool, proxy.http() as probe:
        token = csrf_of(http.get("/console/playground").text)
        form = {"csrf": token, "tenant": "bank", "side": "input", "text": "What is an ISA?"}
        trial = pool.submit(http.post, "/console/playground", data=form)
        deadline = time.monotonic() + 5
        while not guard.judged():
            assert time.monotonic() < deadline, "the trial never reached the guard"
            time.sleep(0.01)
        config["tenants"] = [tenant for tenant in config["tenants"] if tenant["id"] != "shop"]
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        while "shop" in probe.get("/readyz").json()["policies"]:
            assert time.monotonic() < deadline, "the reload never came"
            time.sleep(0.02)
        assert not trial.done(), "the trial ended before the reload: the test proves nothing"
        page = trial.result(timeout=10)
        guard.delay_s = 0.0
        later = http.get("/console/playground").text
    assert page.status_code == 200, page.text
    assert '<option value="shop"' in page.text  # the tenants of the snapshot the request began with
    assert '<option value="shop"' not in later  # a request after the reload sees the new tenancy
