"""Real servers for the tests: any ASGI app under uvicorn on 127.0.0.1 in a thread, and the proxy built from
Settings that point at the doubles."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import uvicorn
import yaml
from starlette.types import ASGIApp

from rsafe_proxy.app import build_app
from rsafe_proxy.config import Settings
from rsafe_proxy.server import ProxyServer, server_config


class _Server(uvicorn.Server):
    """uvicorn's server, noticing `should_exit` within 10 ms instead of 100 ms (tests stop many servers)."""

    async def main_loop(self) -> None:
        await self.on_tick(0)  # sets the default response headers
        while not self.should_exit:
            await asyncio.sleep(0.01)


class _ProxyServer(ProxyServer):
    """The proxy's own server (its limits and graceful shutdown), noticing `should_exit` as quickly."""

    main_loop = _Server.main_loop


@dataclass
class Served:
    """An app being served; `url` is its root (no trailing slash)."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket

    def signal(self) -> None:
        """Ask the server to shut down (lifespan shutdown included)."""
        self.server.should_exit = True

    def join(self) -> None:
        """Wait until the server has shut down (at once if it already has)."""
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout=5)
        self.sock.close()

    def stop(self) -> None:
        """Shut down and wait."""
        self.signal()
        self.join()


def unused_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def start(app: ASGIApp, lifespan: Literal["on", "off"] = "on", settings: Settings | None = None) -> Served:
    """Serve `app` on a free loopback port in a background thread; the caller stops it. With `settings`, it is
    served as `rsafe-proxy serve` serves the proxy (rsafe_proxy.server: limits, timeouts, graceful shutdown)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options: dict[str, Any] = {"lifespan": lifespan, "log_config": None, "log_level": "warning", "loop": "asyncio"}
    server: uvicorn.Server
    if settings is None:
        server = _Server(uvicorn.Config(app, timeout_graceful_shutdown=1, **options))
    else:
        server = _ProxyServer(server_config(settings, app, **options), settings.server.shutdown_grace_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    served = Served(f"http://127.0.0.1:{port}", server, thread, sock)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            served.stop()
            raise RuntimeError("the server did not start (see the log for the lifespan error)")
        time.sleep(0.002)
    return served


@contextmanager
def serve(app: ASGIApp, lifespan: Literal["on", "off"] = "on", settings: Settings | None = None) -> Iterator[Served]:
    """Serve `app` until the block ends (as the proxy is served, with `settings`)."""
    served = start(app, lifespan, settings)
    try:
        yield served
    finally:
        served.stop()


class Servers:
    """Servers started for one test, stopped together (in parallel) at its end."""

    def __init__(self) -> None:
        self.running: list[Served] = []

    def start(self, app: ASGIApp, lifespan: Literal["on", "off"] = "on", settings: Settings | None = None) -> Served:
        """Serve `app` until `close` (as the proxy is served, with `settings`)."""
        served = start(app, lifespan, settings)
        self.running.append(served)
        return served

    def close(self) -> None:
        """Stop every server still running."""
        for served in self.running:
            served.signal()
        for served in self.running:
            served.join()
        self.running.clear()


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def proxy_config(upstream_url: str, guard_url: str, directory: Path, **overrides: Any) -> dict[str, Any]:
    """proxy.yaml's content for a proxy in front of the doubles (sections in `overrides` are merged in)."""
    base: dict[str, Any] = {
        # a short grace: a test that leaves a stream open is not held up at its end
        "server": {"max_body_bytes": 64 * 1024, "input_screening": "parallel", "shutdown_grace_s": 1},
        "upstream": {"base_url": f"{upstream_url}/v1", "timeout_s": 10, "connect_timeout_s": 2},
        "guard": {"engine": "openai", "url": f"{guard_url}/v1", "model": "scripted-guard", "timeout_s": 2},
        "tenants": [{"id": "default", "anonymous": True, "policy": "rsafe-default"}],
        "telemetry": {"spans_file": str(directory / "spans.jsonl")},
        "audit": {"url": str(directory / "decisions.db")},
        "policy_reload_s": 0,
        "base_dir": str(directory),
    }
    return _merge(base, overrides)


def write_policy(directory: Path, name: str, **fields: Any) -> Path:
    """A policy file with two categories (U1 on input, U2 on both sides) and `fields` merged in."""
    policy: dict[str, Any] = {
        "id": name,
        "categories": [
            {"id": "U1", "name": "Violence & Physical Harm", "side": "input"},
            {"id": "U2", "name": "Weapons & Illegal Tactics"},
        ],
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_merge(policy, fields), sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Proxy:
    """The proxy being served, with clients for it."""

    url: str
    settings: Settings
    served: Served
    attempts: list[object] = field(default_factory=list)  # every HTTP request the SDK clients sent

    def stop(self) -> None:
        """Shut the proxy down now (its lifespan flushes the spans file)."""
        self.served.stop()

    @property
    def audit_file(self) -> Path:
        """The SQLite file of the proxy's audit log."""
        assert self.settings.audit.url
        return Path(self.settings.audit.url)

    @property
    def spans_file(self) -> Path:
        """Where the proxy writes its spans."""
        assert self.settings.telemetry.spans_file
        return Path(self.settings.telemetry.spans_file)

    def client(self, api_key: str = "sk-client", max_retries: int = 2, timeout: float = 10.0) -> openai.OpenAI:
        """The OpenAI SDK pointed at the proxy; every HTTP attempt it makes is appended to `attempts`."""

        def count(request: object) -> None:
            self.attempts.append(request)

        # plain HTTP on loopback: verify=False only skips loading the CA bundle (tens of ms per client)
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [count]}, timeout=timeout, verify=False)
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=max_retries, http_client=http_client
        )

    def http(self) -> httpx.Client:
        """A plain HTTP client for what the SDK cannot send (malformed bodies, probes)."""
        return httpx.Client(base_url=self.url, timeout=10, verify=False)


def start_proxy(servers: Servers, settings: Settings) -> Proxy:
    """`build_app(settings)` served on loopback until `servers` close."""
    served = servers.start(build_app(settings), settings=settings)
    return Proxy(served.url, settings, served)


@contextmanager
def run_proxy(settings: Settings) -> Iterator[Proxy]:
    """`build_app(settings)` served on loopback until the block ends."""
    with serve(build_app(settings), settings=settings) as served:
        yield Proxy(served.url, settings, served)
