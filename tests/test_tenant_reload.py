"""proxy.yaml's tenants reload without a restart; a broken edit keeps the last good tenants serving."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from rsafe_proxy.config import load_settings
from tests.doubles import ScriptedGuard
from tests.fake_upstream import FakeUpstream
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


def _two_tenants(
    servers: Servers, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> tuple[Proxy, dict[str, Any], Path]:
    """A proxy reloading tmp_path/proxy.yaml every 50 ms, with tenants a (key sk-a) and b (sk-b); its config and
    the file, for the test to edit."""
    config = proxy_config(upstream.url, guard.url, tmp_path, policy_reload_s=0.05)
    del config["base_dir"]
    config["tenants"] = [
        {"id": "a", "keys": [digest("sk-a")], "policy": "rsafe-default"},
        {"id": "b", "keys": [digest("sk-b")], "policy": "rsafe-default"},
    ]
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return start_proxy(servers, load_settings(path)), config, path


@pytest.mark.parametrize("key", ["sk-a", "sk-b"])
def test_a_key_never_selects_a_tenant_that_is_gone(
    servers: Servers, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path, key: str
) -> None:
    proxy, config, path = _two_tenants(servers, upstream, guard, tmp_path)
    assert answers(proxy, key)
    config["tenants"] = [tenant for tenant in config["tenants"] if tenant["id"] != key[-1]]
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    eventually(lambda: not answers(proxy, key))


def _slow_request(proxy: Proxy, key: str, body: bytes) -> socket.socket:
    """A request whose headers and first half of the body are sent now; the rest is up to the caller."""
    host, port = proxy.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def _rest_and_answer(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(body[len(body) // 2 :])
    answer = b""
    while part := sock.recv(65536):
        answer += part
    sock.close()
    return answer


def test_a_request_whose_tenant_is_removed_while_its_body_arrives_finishes_with_its_snapshot(
    servers: Servers, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> None:
    proxy, config, path = _two_tenants(servers, upstream, guard, tmp_path)
    assert answers(proxy, "sk-b")
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hello " * 50}]}).encode()

    sock = _slow_request(proxy, "sk-b", body)
    time.sleep(0.3)  # the proxy has resolved the tenant and waits for the rest of the body
    config["tenants"] = [tenant for tenant in config["tenants"] if tenant["id"] != "b"]
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    eventually(lambda: not answers(proxy, "sk-b"))  # b is gone for new requests
    answer = _rest_and_answer(sock, body)

    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK", answer  # the request keeps the tenancy it started with
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["choices"][0]["message"]["content"]
