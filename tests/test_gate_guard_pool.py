"""The guard's connection pool: its size is configurable, defaults to 64, and is what the engine's client holds
open at most (counted at a scripted guard on loopback)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from rsafe_proxy.config import Settings
from rsafe_proxy.guard.engine import Sampling
from rsafe_proxy.runtime import build_engine
from tests.doubles import ScriptedGuard
from tests.serving import Servers


class _Concurrency:
    """ASGI middleware counting the connections a server holds at once (the most it saw: `peak`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.open: set[tuple[str, int]] = set()
        self.peak = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] == "http" and client:
            self.open.add((client[0], client[1]))
            self.peak = max(self.peak, len(self.open))
            try:
                await self.app(scope, receive, send)
            finally:
                self.open.discard((client[0], client[1]))
            return
        await self.app(scope, receive, send)


@pytest.mark.parametrize("pool", [2, 64])
def test_the_guard_pool_size_reaches_the_engines_client(servers: Servers, pool: int) -> None:
    double = ScriptedGuard(delay_s=0.3)
    counted = _Concurrency(double.app)
    guard_url = servers.start(counted, lifespan="off").url
    settings = Settings.model_validate(
        {"guard": {"engine": "openai", "url": f"{guard_url}/v1", "model": "g", "max_connections": pool}}
    )
    engine = build_engine(settings.guard)

    async def screen_eight() -> None:
        sampling = Sampling(0.0, 1.0, 1.0, 16)
        try:
            await asyncio.gather(*(engine.complete(f"User: hello {n}", sampling) for n in range(8)))
        finally:
            await engine.aclose()

    asyncio.run(screen_eight())
    assert counted.peak == min(pool, 8)


def test_the_guard_pool_size_is_configurable_and_defaults_to_64() -> None:
    assert Settings().guard.max_connections == 64
    assert Settings.model_validate({"guard": {"max_connections": 256}}).guard.max_connections == 256
    with pytest.raises(ValueError):
        Settings.model_validate({"guard": {"max_connections": 0}})
