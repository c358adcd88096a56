"""build_app(settings) -> the ASGI app. Its lifespan owns the upstream client and the guard engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from rsafe_proxy.config import Settings
from rsafe_proxy.console.routes import Console
from rsafe_proxy.middleware import BodyLimit, BodyTimeout, ErrorBoundary, last_resort
from rsafe_proxy.paths import CanonicalPath
from rsafe_proxy.policy.store import PolicyStore
from rsafe_proxy.policy.tenancy import policy_paths
from rsafe_proxy.routes import ROUTES, TENANCY, carries_key
from rsafe_proxy.runtime import Runtime
from rsafe_proxy.telemetry import Recorder
from rsafe_proxy.telemetry.http import TraceRequests


class TenancySnapshot:
    """Reads the live tenancy (tenants and policies) once per HTTP request and puts it in the scope (routes.TENANCY):
    the key check on the query and the route read that one snapshot, even where a reload swaps it between them."""

    def __init__(self, app: ASGIApp, runtime: Callable[[], Runtime | None]) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (runtime := self.runtime()) is not None:
            scope[TENANCY] = runtime.tenancy
        await self.app(scope, receive, send)


class _ProxyApp(Starlette):
    """Starlette with its last-resort handler and the proxy's middleware, without its ExceptionMiddleware: no route
    raises HTTPException (errors are ProxyErrors, answered by ErrorBoundary, which also answers the one Starlette
    raises itself, a method no route serves), and its wrapping cost every request a frame and a send wrapper."""

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = self.router
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return ServerErrorMiddleware(app, handler=last_resort, debug=self.debug)


def build_app(settings: Settings) -> ASGIApp:
    """The proxy as an ASGI app. Policies are loaded now, so a bad policy stops start-up (FileInvalid)."""
    policies = PolicyStore.load(policy_paths(settings))
    server = settings.server

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime = Runtime.start(settings, policies)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.close()

    def live() -> Runtime | None:
        runtime: Runtime | None = getattr(proxy.state, "runtime", None)
        return runtime

    def recorder() -> Recorder | None:
        runtime = live()
        return runtime.recorder if runtime is not None else None

    def proxy_key(scope: Scope, value: str) -> bool:
        runtime = live()
        return runtime is not None and TENANCY in scope and carries_key(runtime, scope[TENANCY], value)

    # the console's pages go before the proxy's catch-all routes; off, /console is an unknown path like any other
    routes = [*Console(settings.console).routes, *ROUTES] if settings.console.enabled else ROUTES
    proxy = _ProxyApp(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            # first: one tenancy snapshot for the whole request (a reload may swap the live one at any await)
            Middleware(TenancySnapshot, runtime=live),
            # outermost after it: every request, refused ones included, has its server span and decision id
            Middleware(TraceRequests, recorder=recorder),
            Middleware(ErrorBoundary),  # outermost: whatever fails below is answered as an OpenAI-style error
            # before anything reads the path: routing and the upstream URL see only its canonical form, and no
            # key in the query reaches the upstream or the access log
            Middleware(CanonicalPath, is_secret=proxy_key),
            Middleware(BodyTimeout, idle_s=server.body_idle_timeout_s, total_s=server.body_timeout_s),
            Middleware(BodyLimit, max_bytes=server.max_body_bytes),
        ],
    )
    return proxy
