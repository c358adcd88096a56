"""build_app(settings) -> the ASGI app. Its lifespan owns the upstream client and the guard engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp

from rsafe_proxy.config import Settings
from rsafe_proxy.middleware import BodyLimit
from rsafe_proxy.policy.store import PolicyStore
from rsafe_proxy.routes import ROUTES
from rsafe_proxy.runtime import Runtime, policy_paths


def build_app(settings: Settings) -> ASGIApp:
    """The proxy as an ASGI app. Policies are loaded now, so a bad policy stops start-up (FileInvalid)."""
    policies = PolicyStore.load(policy_paths(settings))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime = Runtime.start(settings, policies)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.close()

    return Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        middleware=[Middleware(BodyLimit, max_bytes=settings.server.max_body_bytes)],
    )
