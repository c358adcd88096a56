"""Anything unexpected is an OpenAI-shaped JSON 500 naming nothing of its cause, never Starlette's plain-text
"Internal Server Error": an engine that fails in a way no engine should, over real loopback, and a middleware
outside the error boundary."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rsafe_proxy.config import Settings
from rsafe_proxy.guard.engine import EngineInfo, EngineSettings, GuardOutput, Sampling
from rsafe_proxy.middleware import last_resort
from tests.doubles import ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Servers, proxy_config, serve, start_proxy

SECRET = "secret internals of the engine"


class BrokenEngine:
    """A guard engine (`engine: tests.test_unexpected_errors:BrokenEngine`) whose every call fails with an error
    that is no GuardEngineError: a bug, as far as the proxy can tell."""

    name = "broken"
    info = EngineInfo("broken")

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> BrokenEngine:
        return cls()

    async def start(self) -> None:
        return None

    async def complete(
        self, prompt: str, sampling: Sampling, system: str | None = None, *, cache_salt: str = "", requester: str = ""
    ) -> GuardOutput:
        raise RuntimeError(SECRET)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def _assert_internal(response: httpx.Response) -> None:
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert set(error) >= {"message", "type", "code"}
    assert SECRET not in response.text and "RuntimeError" not in response.text


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_that_fails_unexpectedly_is_a_json_500(
    servers: Servers,
    upstream: FakeUpstream,
    guard: ScriptedGuard,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    stream: bool,
) -> None:
    # sequential: in parallel mode the upstream is asked while the prompt is judged, so "nothing went upstream"
    # would depend on which of the two ran first
    config = proxy_config(
        upstream.url,
        guard.url,
        tmp_path,
        guard={"engine": f"{__name__}:BrokenEngine"},
        server={"input_screening": "sequential"},
    )
    proxy = start_proxy(servers, Settings.model_validate(config))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "stream": stream}
    with caplog.at_level(logging.ERROR, logger="rsafe_proxy"), proxy.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    _assert_internal(response)
    traced = [record for record in caplog.records if record.name == "rsafe_proxy" and record.exc_info]
    assert traced and SECRET in str(traced[0].exc_info[1] if traced[0].exc_info else "")
    assert upstream.requests == []  # nothing went upstream on a failed screen

    with pytest.raises(openai.InternalServerError) as raised:
        proxy.client(max_retries=0).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hello"}]
        )
    assert isinstance(raised.value.body, dict) and raised.value.body["code"] == "internal_error"


class _FailsOutside:
    """A middleware outside any error boundary (where the proxy's request tracing sits) that fails."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/outside":
            raise RuntimeError(SECRET)
        await self.app(scope, receive, send)


async def _fine(request: Request) -> Response:
    return JSONResponse({"fine": True})


def test_an_error_outside_every_middleware_is_still_json() -> None:
    plain = Starlette(routes=[Route("/{path}", _fine)], middleware=[Middleware(_FailsOutside)])
    guarded = Starlette(
        routes=[Route("/{path}", _fine)],
        middleware=[Middleware(_FailsOutside)],
        exception_handlers={Exception: last_resort},
    )
    with serve(plain, lifespan="off") as served, httpx.Client(base_url=served.url) as http:
        assert http.get("/outside").text == "Internal Server Error"  # what Starlette alone answers: plain text
    with serve(guarded, lifespan="off") as served:
        # a connection each: the server closes the one whose request failed (Starlette re-raises after the
        # handler's answer), and a reused one could be read as that close arrives
        with httpx.Client(base_url=served.url) as http:
            _assert_internal(http.get("/outside"))
        with httpx.Client(base_url=served.url) as http:
            assert http.get("/inside").json() == {"fine": True}
