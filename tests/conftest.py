"""Fixtures: the doubles and the proxy, each a real uvicorn server on loopback, stopped together after a test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rsafe_proxy.config import Settings
from tests.doubles import ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy, Servers, proxy_config, start_proxy

MakeProxy = Callable[..., Proxy]


@pytest.fixture(autouse=True, scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """RSAFE_STATE_DIR for the whole run (subprocesses included): no test writes an audit log into the home."""
    directory = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RSAFE_STATE_DIR", str(directory))
        yield directory


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def servers() -> Iterator[Servers]:
    group = Servers()
    try:
        yield group
    finally:
        group.close()


@pytest.fixture
def upstream(servers: Servers) -> FakeUpstream:
    double = FakeUpstream()
    double.url = servers.start(double.app, lifespan="off").url
    return double


@pytest.fixture
def guard(servers: Servers) -> ScriptedGuard:
    double = ScriptedGuard()
    double.url = servers.start(double.app, lifespan="off").url
    return double


@pytest.fixture
def make_proxy(servers: Servers, upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path) -> MakeProxy:
    """make_proxy(**sections) -> a proxy in front of the doubles; sections are merged into its proxy.yaml."""

    def make(**overrides: Any) -> Proxy:
        config = proxy_config(upstream.url, guard.url, tmp_path, **overrides)
        return start_proxy(servers, Settings.model_validate(config))

    return make


@pytest.fixture
def proxy(make_proxy: MakeProxy) -> Proxy:
    """The proxy with the packaged default policy, in drop-in mode."""
    return make_proxy()
