"""The HTTP surface: the only module that knows Starlette requests and responses."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from rsafe_proxy.apis import CHAT, COMPLETIONS, RESPONSES, guardrail
from rsafe_proxy.calls import Call, Reply, StreamReply
from rsafe_proxy.console.keys import ConsoleKeys
from rsafe_proxy.departure import ClientWatch
from rsafe_proxy.draining import SHUTDOWN_MESSAGE, Drain, until_drained
from rsafe_proxy.errors import InvalidRequest, NotFound, ProxyError, ServerShuttingDown, Unauthorized
from rsafe_proxy.middleware import send_client_gone
from rsafe_proxy.paths import pattern_matches, pattern_regex
from rsafe_proxy.pipeline import Pipeline
from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.policy.tenancy import Tenancy
from rsafe_proxy.policy.tenants import KeyRing, Tenant, bearer_token, configured_digests
from rsafe_proxy.runtime import Runtime
from rsafe_proxy.telemetry.context import note_tenant, traced_body
from rsafe_proxy.upstream import host_of

# The operations the proxy screens (method, canonical path pattern); the ROUTES below serve them.
SCREENED: tuple[tuple[str, str], ...] = (
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{response_id}"),
    ("POST", "/v1/responses/{response_id}/cancel"),
    ("GET", "/v1/chat/completions"),
    ("GET", "/v1/chat/completions/{completion_id}"),
    ("POST", "/v1/chat/completions/{completion_id}"),
)
# Forwarded unscreened because they generate nothing and return no generated content (a policy adds more with
# `passthrough`). Not here, so 404: images, audio, batches, files and their content, assistants, threads,
# conversations, realtime, a response's input items, a completion's messages, and whatever OpenAI adds next.
PASSTHROUGH: tuple[tuple[str, str], ...] = (
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("DELETE", "/v1/models/{model}"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/moderations"),
    ("POST", "/v1/responses/input_tokens"),
    ("DELETE", "/v1/responses/{response_id}"),
    ("DELETE", "/v1/chat/completions/{completion_id}"),
)


def _by_method(routes: tuple[tuple[str, str], ...]) -> dict[str, re.Pattern[str]]:
    """For each method of `routes`, one regex its paths fully match (paths.pattern_regex)."""
    methods = dict.fromkeys(method for method, _ in routes)
    return {method: pattern_regex(path for want, path in routes if want == method) for method in methods}


# SCREENED and PASSTHROUGH as one regex per method, compiled once (passes_through runs on every forwarded call)
_SCREENED_PATHS = _by_method(SCREENED)
_PASSTHROUGH_PATHS = _by_method(PASSTHROUGH)
# A suffix a lenient upstream may ignore: from a dot in the last segment to its end (`.json`).
_SUFFIX = re.compile(r"\.[^/]*$")
# Headers other APIs carry keys in (Anthropic-style, Azure): a keyed tenant's never go upstream.
_KEY_HEADERS = frozenset({"x-api-key", "api-key"})


def error_response(error: ProxyError) -> JSONResponse:
    """The OpenAI-style error body with the error's status and headers, and the decision id (error.decision_id)
    to look the request up by in the traces."""
    return JSONResponse(traced_body(error), status_code=error.status, headers=error.headers())


def _error_reply(error: ProxyError) -> Reply:
    """`error` as error_response sends it (the same JSON, status and headers)."""
    body = json.dumps(traced_body(error), ensure_ascii=False, separators=(",", ":")).encode()
    return Reply(error.status, body, {**error.headers(), "content-type": "application/json"})


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _admin_keys(runtime: Runtime) -> KeyRing:
    """The admin keys (server.admin_keys); env keys are read now, so a rotated variable takes effect."""
    keys = runtime.settings.server.admin_keys
    return KeyRing(configured_digests(keys, os.environ) if keys else ())


def _console_keys(runtime: Runtime) -> KeyRing:
    """The console's keys (console.admin_key, console.tenant_keys), when it is on: credentials like the others."""
    console = runtime.settings.console
    return ConsoleKeys.read(console, os.environ).ring if console.enabled else KeyRing(())


# Where the outermost middleware (app.TenancySnapshot) puts the tenancy a request reads, in its ASGI scope.
TENANCY = "rsafe.tenancy"


def request_tenancy(scope: Scope, runtime: Runtime) -> Tenancy:
    """The tenancy a request reads, all of it the same snapshot (scope[TENANCY]) whatever a reload swaps in
    meanwhile; the live one where no middleware put one there."""
    tenancy: Tenancy | None = scope.get(TENANCY)
    return tenancy if tenancy is not None else runtime.tenancy


def carries_key(runtime: Runtime, tenancy: Tenancy, value: str) -> bool:
    """True when `value` (a header or query value) carries a proxy key (of `tenancy`), an admin key or a console
    key anywhere."""
    return (
        tenancy.directory.keys.carried_by(value)
        or _admin_keys(runtime).carried_by(value)
        or _console_keys(runtime).carried_by(value)
    )


def _one(request: Request, name: str) -> str | None:
    """The header's value; InvalidRequest when it is sent twice (which one counts would be anyone's guess)."""
    values = request.headers.getlist(name)
    if len(values) > 1:
        raise InvalidRequest(f"Send the {name} header once.")
    return values[0] if values else None


def _forwardable(request: Request, tenant: Tenant, rings: tuple[KeyRing, ...]) -> dict[str, str]:
    """The client's headers (first value of each) without any that carries a proxy or admin key, and, for a
    keyed tenant, without the key headers of other APIs: a proxy key never reaches the upstream."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        if name in headers or (tenant.keyed and name in _KEY_HEADERS):
            continue
        if not any(ring.carried_by(value) for ring in rings):
            headers[name] = value
    return headers


async def _call(request: Request) -> Call:
    runtime = _runtime(request)
    tenancy = request_tenancy(request.scope, runtime)  # the snapshot this request started with (see TENANCY)
    tenants = tenancy.directory
    authorization = _one(request, "authorization")
    if authorization is None and request.scope["path"] == guardrail.PATH and (key := _one(request, "x-api-key")):
        authorization = f"Bearer {key}"  # LiteLLM sends a guardrail's api_key so; nothing here goes upstream
    tenant = tenants.resolve(authorization)
    note_tenant(tenant.id)
    body = await request.body()
    # scope['raw_path'] is the canonical path (paths.CanonicalPath): the upstream URL is built from it alone
    raw_path: bytes = request.scope["raw_path"]
    return Call(
        method=request.method,
        path=raw_path.decode("ascii").removeprefix("/v1").lstrip("/"),
        query=request.scope["query_string"].decode("ascii"),
        headers=_forwardable(request, tenant, (tenants.keys, _admin_keys(runtime), _console_keys(runtime))),
        # a GET, HEAD or DELETE body has no meaning (no OpenAI-compatible route reads one): none goes on
        body=b"" if request.method in ("GET", "HEAD", "DELETE") else body,
        tenant=tenant,
        policy=tenancy.policy(tenant.id),
    )


def _raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


async def send_reply(reply: Reply | StreamReply, drain: Drain, send: Send) -> None:
    """Send `reply` (an event stream ends cleanly at shutdown, see until_drained); a stream's `closing` is
    awaited once it is over, however it ended (a client gone, a send that failed)."""
    if isinstance(reply, Reply):
        headers = [(name, value) for name, value in _raw_headers(reply.headers) if name != b"content-length"]
        if reply.status >= 200 and reply.status not in (204, 304):  # as Starlette's Response
            headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
        return
    chunks = reply.chunks
    if any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in reply.headers.items()):
        chunks = until_drained(chunks, drain, reply.ending)  # at shutdown an event stream ends with an error event
    try:
        await send({"type": "http.response.start", "status": reply.status, "headers": _raw_headers(reply.headers)})
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        close = getattr(chunks, "aclose", None)  # one stopped mid-way (a client gone) ends now, not at collection
        if close is not None:
            await close()
        if reply.closing is not None:
            await reply.closing()


async def _serve(
    request: Request, send: Send, work: Callable[[Pipeline, Call], Awaitable[Reply | StreamReply]]
) -> None:
    """Run `work` and send its reply; a client that leaves before the answer's end cancels it (and the upstream
    and guard calls, and the stream's reading and judging): a 499 is recorded when no answer had started."""
    try:
        call = await _call(request)
    except ProxyError as error:
        await send_reply(_error_reply(error), Drain(), send)
        return
    runtime = _runtime(request)
    async with ClientWatch.of(request.scope, request.receive, send) as watch:
        try:
            async with runtime.drain.bounded() as bound:  # at shutdown, the grace period bounds the wait
                reply = await work(runtime.pipeline, call)
        except TimeoutError:
            if not bound.expired():
                raise
            reply = _error_reply(ServerShuttingDown(SHUTDOWN_MESSAGE))
        except ProxyError as error:
            reply = _error_reply(error)
        await send_reply(reply, runtime.drain, watch.send)
    if watch.left and not watch.started:
        await send_client_gone(send)


class _Served:
    """An ASGI endpoint that serves its requests with `work` (see _serve)."""

    def __init__(self, work: Callable[[Pipeline, Call], Awaitable[Reply | StreamReply]]) -> None:
        self.work = work

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _serve(Request(scope, receive), send, self.work)


# The screened operations' work, each served by a _Served endpoint (ROUTES)


async def chat_completions(pipeline: Pipeline, call: Call) -> Reply | StreamReply:
    """POST /v1/chat/completions."""
    return await pipeline.complete(call, CHAT)


async def completions(pipeline: Pipeline, call: Call) -> Reply | StreamReply:
    """POST /v1/completions."""
    return await pipeline.complete(call, COMPLETIONS)


async def responses(pipeline: Pipeline, call: Call) -> Reply | StreamReply:
    """POST /v1/responses: the instructions and input messages, then the output, screened."""
    return await pipeline.complete(call, RESPONSES)


async def stored_response(pipeline: Pipeline, call: Call) -> Reply | StreamReply:
    """GET /v1/responses/{id}, POST /v1/responses/{id}/cancel (which takes no body; none is sent): a stored
    response, its output screened again."""
    return await pipeline.retrieve(call, RESPONSES)


async def stored_chat_completions(pipeline: Pipeline, call: Call) -> Reply | StreamReply:
    """GET /v1/chat/completions[/{id}], POST /v1/chat/completions/{id} (metadata update, which returns the
    completion): stored chat completions, their choices screened again."""
    return await pipeline.retrieve(call, CHAT)


async def litellm_guardrail(pipeline: Pipeline, call: Call) -> Reply | StreamReply:
    """POST /beta/litellm_basic_guardrail_api: LiteLLM's Generic Guardrail API."""
    return await pipeline.guardrail(call)


def _screened_spelling(method: str, path: str) -> bool:
    """True when `path` is a screened route spelled another way (case, a `.json` suffix) that a lenient
    upstream could still read as that route."""
    screened = _SCREENED_PATHS.get(method)
    if screened is None:
        return False
    lowered = path.lower()
    return screened.fullmatch(lowered) is not None or screened.fullmatch(_SUFFIX.sub("", lowered)) is not None


def passes_through(method: str, path: str, policy: Policy) -> bool:
    """True when `method path` (canonical) is on the pass-through allow-list: the proxy's, or the policy's."""
    method = "GET" if method == "HEAD" else method
    if _screened_spelling(method, path):
        return False
    if (allowed := _PASSTHROUGH_PATHS.get(method)) is not None and allowed.fullmatch(path) is not None:
        return True
    return any(route.method == method and pattern_matches(route.path, path) for route in policy.passthrough)


async def passthrough(pipeline: Pipeline, call: Call) -> Reply | StreamReply:
    """Every other /v1/* route: forwarded unscreened when on the allow-list of routes that generate nothing,
    else 404 (DESIGN §3)."""
    path = f"/v1/{call.path}"
    if not passes_through(call.method, path, call.policy):
        raise NotFound(
            f"{call.method} {path} is not served by this proxy: it screens chat completions, completions and "
            "responses, and forwards unscreened only routes that generate nothing (models, embeddings, "
            "moderations, deletions, and those the tenant's policy lists under `passthrough`)."
        )
    return await pipeline.forward(call)


async def healthz(request: Request) -> Response:
    """The process is alive."""
    return JSONResponse({"status": "ok"})


def _admin_refusal(request: Request) -> Response | None:
    """401 unless the caller shows an admin key, where server.admin_keys is set; None when it may proceed."""
    runtime = _runtime(request)
    if not runtime.settings.server.admin_keys:
        return None
    # configured keys whose variables are unset leave an empty ring: it holds nothing, so the endpoint stays shut
    if _admin_keys(runtime).holds(bearer_token(request.headers.get("authorization"))):
        return None
    return error_response(Unauthorized("This endpoint needs 'Authorization: Bearer <admin key>'."))


UPSTREAM_RECHECK_S = 5.0  # /readyz connects to the upstream again when its last check is older than this


async def readyz(request: Request) -> Response:
    """The guard can serve verdicts and every policy is loaded; rejected policy edits are reported."""
    if (refusal := _admin_refusal(request)) is not None:
        return refusal
    runtime = _runtime(request)
    # the upstream is connected to again at most every UPSTREAM_RECHECK_S, alongside the guard's probe
    guard_ready, _ = await asyncio.gather(runtime.guard_ready(), runtime.check_upstream(max_age_s=UPSTREAM_RECHECK_S))
    # reported, not required: an upstream outage taking every proxy replica out of its load balancer would
    # turn the clear 502 a client gets now into refused connections (DESIGN §3: guard and policies loaded)
    upstream_ok = runtime.upstream_error is None
    tenancy = runtime.tenancy  # read once: a reload swaps it
    errors = tenancy.policies.errors()
    if tenancy.config_error:
        errors = {**errors, "proxy.yaml": tenancy.config_error}
    body: dict[str, Any] = {
        "status": "ready" if guard_ready else "not ready",
        "guard": {"engine": runtime.engine_name, "ready": guard_ready},
        "upstream": {
            "host": host_of(runtime.settings.upstream.base_url),  # no path or credentials: /readyz may be open
            "reachable": upstream_ok,
            "error": runtime.upstream_error,
        },
        "policies": {tenant: entry.policy.version for tenant, entry in tenancy.policies.entries.items()},
        "policy_errors": errors,
    }
    return JSONResponse(body, status_code=200 if guard_ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    if (refusal := _admin_refusal(request)) is not None:
        return refusal
    return Response(_runtime(request).recorder.metrics.render(), media_type="text/plain; version=0.0.4")


async def not_found(request: Request) -> Response:
    """Paths outside /v1 that the proxy does not serve."""
    return error_response(NotFound(f"Unknown path: {request.url.path}"))


_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/chat/completions", _Served(chat_completions), methods=["POST"]),
    Route("/v1/completions", _Served(completions), methods=["POST"]),
    Route("/v1/responses", _Served(responses), methods=["POST"]),
    # stored answers: a blocked answer is stored upstream as it was generated, and its id was returned; every
    # operation that returns one screens it
    Route("/v1/responses/{response_id}", _Served(stored_response), methods=["GET"]),
    Route("/v1/responses/{response_id}/cancel", _Served(stored_response), methods=["POST"]),
    Route("/v1/chat/completions", _Served(stored_chat_completions), methods=["GET"]),
    Route("/v1/chat/completions/{completion_id}", _Served(stored_chat_completions), methods=["GET", "POST"]),
    Route(guardrail.PATH, _Served(litellm_guardrail), methods=["POST"]),
    Route("/v1/{rest:path}", _Served(passthrough), methods=_METHODS),  # the allow-list decides
    Route("/{rest:path}", not_found, methods=_METHODS),
]
