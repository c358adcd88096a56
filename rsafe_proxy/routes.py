"""The HTTP surface: the only module that knows Starlette requests and responses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rsafe_proxy import litellm_api
from rsafe_proxy.errors import NotFound, ProxyError
from rsafe_proxy.pipeline import Call, Pipeline, Reply, StreamReply
from rsafe_proxy.runtime import Runtime


def error_response(error: ProxyError) -> JSONResponse:
    """The OpenAI-style error body with the error's status and headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _call(request: Request) -> Call:
    runtime = _runtime(request)
    authorization = request.headers.get("authorization")
    if authorization is None and request.url.path == litellm_api.PATH and (key := request.headers.get("x-api-key")):
        authorization = f"Bearer {key}"  # LiteLLM sends a guardrail's api_key so; nothing here goes upstream
    tenant = runtime.tenants.resolve(authorization)
    body = await request.body()
    return Call(
        method=request.method,
        path=request.url.path.removeprefix("/v1").lstrip("/"),
        query=request.url.query,
        headers=dict(request.headers),
        body=body,
        tenant=tenant,
        policy=runtime.policies.get(tenant.id),
    )


def _response(reply: Reply | StreamReply) -> Response:
    if isinstance(reply, Reply):
        return Response(reply.body, status_code=reply.status, headers=reply.headers)
    return StreamingResponse(reply.chunks, status_code=reply.status, headers=reply.headers)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _serve(request: Request, work: Callable[[Pipeline, Call], Awaitable[Reply | StreamReply]]) -> Response:
    """Run `work`; a client that leaves before the answer cancels it (and the upstream and guard calls)."""
    try:
        call = await _call(request)
        task = asyncio.ensure_future(work(_runtime(request).pipeline, call))
        watcher = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return Response(status_code=499)
        return _response(task.result())
    except ProxyError as error:
        return error_response(error)


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    return await _serve(request, lambda pipeline, call: pipeline.complete(call, "chat"))


async def completions(request: Request) -> Response:
    """POST /v1/completions."""
    return await _serve(request, lambda pipeline, call: pipeline.complete(call, "completion"))


async def responses(request: Request) -> Response:
    """POST /v1/responses: the instructions and input messages, then the output, screened."""
    return await _serve(request, lambda pipeline, call: pipeline.complete(call, "responses"))


async def stored_response(request: Request) -> Response:
    """GET /v1/responses/{id}: a stored response, its output screened again."""
    return await _serve(request, lambda pipeline, call: pipeline.retrieve(call, "responses"))


async def stored_chat_completions(request: Request) -> Response:
    """GET /v1/chat/completions[/{id}]: stored chat completions, their choices screened again."""
    return await _serve(request, lambda pipeline, call: pipeline.retrieve(call, "chat"))


async def litellm_guardrail(request: Request) -> Response:
    """POST /beta/litellm_basic_guardrail_api: LiteLLM's Generic Guardrail API."""
    return await _serve(request, lambda pipeline, call: pipeline.guardrail(call))


async def passthrough(request: Request) -> Response:
    """Every other /v1/* route: forwarded unscreened (models, embeddings, files, deletions; DESIGN §3)."""
    return await _serve(request, lambda pipeline, call: pipeline.forward(call))


async def healthz(request: Request) -> Response:
    """The process is alive."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """The guard can serve verdicts and every policy is loaded; rejected policy edits are reported."""
    runtime = _runtime(request)
    guard_ready = await runtime.guard_ready()
    errors = runtime.policies.errors()
    if runtime.config_error:
        errors = {**errors, "proxy.yaml": runtime.config_error}
    body: dict[str, Any] = {
        "status": "ready" if guard_ready else "not ready",
        "guard": {"engine": runtime.engine_name, "ready": guard_ready},
        "policies": {tenant: runtime.policies.get(tenant).version for tenant in runtime.policies.entries},
        "policy_errors": errors,
    }
    return JSONResponse(body, status_code=200 if guard_ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(_runtime(request).recorder.metrics.render(), media_type="text/plain; version=0.0.4")


async def not_found(request: Request) -> Response:
    """Paths outside /v1 that the proxy does not serve."""
    return error_response(NotFound(f"Unknown path: {request.url.path}"))


ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
    # stored answers: a blocked answer is stored upstream as it was generated, and its id was returned
    Route("/v1/responses/{response_id}", stored_response, methods=["GET"]),
    Route("/v1/chat/completions", stored_chat_completions, methods=["GET"]),
    Route("/v1/chat/completions/{completion_id}", stored_chat_completions, methods=["GET"]),
    Route(litellm_api.PATH, litellm_guardrail, methods=["POST"]),
    Route("/v1/{rest:path}", passthrough, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    Route("/{rest:path}", not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]),
]
