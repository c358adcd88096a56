"""The gate attacked from the outside, as a hostile client or a hostile (or compromised) upstream would: request
fields the model reads beside the messages, statuses and headers an upstream uses to carry text or forge a
verdict, streams whose choices a client reads differently than the proxy. Through the real proxy on loopback,
with the scripted guard and the fake upstream; each test names the attack it shows held."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from rsafe_proxy.config import Settings
from rsafe_proxy.errors import UpstreamUnavailable
from rsafe_proxy.http_client import HttpClient, Timeouts
from rsafe_proxy.policy.loading import load_policy
from rsafe_proxy.streaming import sse_events
from rsafe_proxy.upstream import Upstream
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, UNSAFE_ANSWER, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy, Servers, proxy_config, start_proxy, write_policy

CHAT = "/v1/chat/completions"
SEQUENTIAL = {"input_screening": "sequential"}  # nothing reaches the upstream before its verdict
CHAT_BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def post(proxy: Proxy, path: str, body: dict[str, Any]) -> httpx.Response:
    with proxy.http() as http:
        return http.post(path, json=body)


def blocked(response: httpx.Response) -> bool:
    return response.status_code == 400 and response.json()["error"]["code"] == "content_filter"


def completion(content: str, index: Any = 0) -> dict[str, Any]:
    choice = {"index": index, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice]}


def chunk(content: str, index: Any = 0, finish: str | None = None) -> bytes:
    choice = {"index": index, "delta": {"content": content}, "finish_reason": finish}
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n".encode()


@pytest.fixture
def sequential(make_proxy: MakeProxy) -> Proxy:
    return make_proxy(server=SEQUENTIAL)


# -- input the model reads beside the messages ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # vLLM renders a request's own chat template, its kwargs and RAG documents into the prompt
        (CHAT, {**CHAT_BODY, "chat_template": f"{{{{ '{UNSAFE}' }}}}{{% for m in messages %}}{{{{ m.content }}}}"}),
        (CHAT, {**CHAT_BODY, "chat_template_kwargs": {"persona": UNSAFE}}),
        (CHAT, {**CHAT_BODY, "documents": [{"title": "notes", "text": UNSAFE}]}),
        # a completion's suffix is read by the model (fill in the middle)
        ("/v1/completions", {"model": "m", "prompt": "hi", "suffix": UNSAFE}),
        # a stored prompt template filled with the request's variables
        ("/v1/responses", {"model": "m", "input": "hi", "prompt": {"id": "pmpt_1", "variables": {"topic": UNSAFE}}}),
    ],
    ids=["chat_template", "chat_template_kwargs", "documents", "suffix", "prompt_variables"],
)
def test_request_fields_beside_the_messages_are_judged(
    sequential: Proxy, upstream: FakeUpstream, path: str, body: dict[str, Any]
) -> None:
    assert blocked(post(sequential, path, body))
    assert upstream.calls(path) == []


@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/v1/responses"])
def test_a_rewrite_drops_the_fields_it_judged_with_the_new_turns(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path, path: str
) -> None:
    policy = write_policy(
        tmp_path, "rewriting", categories=[{"id": "U2", "name": "Weapons & Illegal Tactics", "action": "rewrite"}]
    )
    proxy = make_proxy(server=SEQUENTIAL, tenants=[{"id": "default", "anonymous": True, "policy": str(policy)}])
    asked = {CHAT: CHAT_BODY, "/v1/completions": {"model": "m", "prompt": "hi"}, "/v1/responses": {"model": "m"}}
    body = {**asked[path], "input": "hi"} if path == "/v1/responses" else dict(asked[path])
    body |= {"documents": [{"text": UNSAFE}], "temperature": 0.5}
    assert post(proxy, path, body).status_code == 200
    sent = upstream.calls(path)[-1].body
    assert UNSAFE not in json.dumps(sent) and "documents" not in sent and sent["temperature"] == 0.5
    assert load_policy(policy).messages.rewrite.input in json.dumps(sent)


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_text", "text": UNSAFE},
        {"type": "refusal", "refusal": UNSAFE},
        {"type": "future_part", "future_field": {"deep": UNSAFE}},
    ],
)
def test_content_parts_of_any_type_are_judged(sequential: Proxy, upstream: FakeUpstream, part: dict[str, Any]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    assert blocked(post(sequential, CHAT, body))
    assert upstream.calls(CHAT) == []


# -- what an upstream sends back -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [201, 203, 206])
def test_a_success_status_other_than_200_is_refused(proxy: Proxy, upstream: FakeUpstream, status: int) -> None:
    upstream.fail = (status, completion(UNSAFE_ANSWER))
    reply = post(proxy, CHAT, CHAT_BODY)
    assert reply.status_code == 502 and UNSAFE not in reply.text


def test_an_upstream_redirect_is_not_handed_to_the_client(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.fail = (307, completion(UNSAFE_ANSWER))
    reply = post(proxy, CHAT, CHAT_BODY)
    assert reply.status_code == 502 and UNSAFE not in reply.text


FORGED = {name: "forged" for name in ("x-rsafe-input", "x-rsafe-output", "x-rsafe-tenant", "x-rsafe-policy")}


def before(servers: Servers, guard: ScriptedGuard, tmp_path: Path, body: bytes, headers: dict[str, str]) -> Proxy:
    """The proxy in front of an upstream that answers every request with `body` (JSON) and `headers`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await Response(body, media_type="application/json", headers=headers)(scope, receive, send)

    upstream_url = servers.start(app, lifespan="off").url
    return start_proxy(servers, Settings.model_validate(proxy_config(upstream_url, guard.url, tmp_path)))


def test_a_passed_through_answer_that_breaks_off_is_a_502_not_a_shorter_answer(
    servers: Servers, guard: ScriptedGuard, tmp_path: Path
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # says 100 bytes, sends 12, closes
        if scope["type"] == "http":
            headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"data": [1,', "more_body": False})

    upstream_url = servers.start(app, lifespan="off").url
    proxy = start_proxy(servers, Settings.model_validate(proxy_config(upstream_url, guard.url, tmp_path)))
    with proxy.http() as http:
        reply = http.get("/v1/models")
    assert reply.status_code == 502, reply.text
    assert reply.json()["error"]["code"] == "upstream_unavailable"


def test_a_passed_through_stream_that_breaks_off_is_cut_for_the_client_too(
    servers: Servers, guard: ScriptedGuard, tmp_path: Path
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # a chunked answer, then the connection drops
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
            raise ConnectionResetError("the upstream went away")

    upstream_url = servers.start(app, lifespan="off").url
    proxy = start_proxy(servers, Settings.model_validate(proxy_config(upstream_url, guard.url, tmp_path)))
    received = b""
    with proxy.http() as http, http.stream("GET", "/v1/models") as reply:
        assert reply.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # before, the relay ended the body as if it were whole
            for piece in reply.iter_raw():
                received += piece
    assert received == b"x" * 1000
    with proxy.http() as http:  # the proxy carries on
        assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize(("method", "path"), [("POST", CHAT), ("GET", f"{CHAT}/c1"), ("GET", "/v1/models")])
def test_the_upstream_cannot_forge_the_proxy_verdict_headers(
    servers: Servers, guard: ScriptedGuard, tmp_path: Path, method: str, path: str
) -> None:
    proxy = before(servers, guard, tmp_path, json.dumps(completion("fine")).encode(), FORGED)
    with proxy.http() as http:
        reply = http.request(method, path, json=CHAT_BODY if method == "POST" else None)
    assert reply.status_code == 200
    assert all(reply.headers.get(name) != value for name, value in FORGED.items())


def test_a_stream_whose_choice_index_a_client_reads_otherwise_is_judged_as_the_client_reads_it(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    # Python (and JavaScript) clients group by index: 1, 1.0 and True are one key to them
    half = len(UNSAFE) // 2
    upstream.script = [chunk(UNSAFE[:half], 1), chunk(UNSAFE[half:], True), chunk("", 1, "stop"), b"data: [DONE]\n\n"]
    with proxy.http() as http, http.stream("POST", CHAT, json={**CHAT_BODY, "stream": True}) as reply:
        raw = "".join(reply.iter_text())
    by_index: dict[Any, str] = {}
    for block in raw.split("\n\n"):
        if block.startswith("data: {"):
            for choice in json.loads(block[6:])["choices"]:
                by_index[choice["index"]] = by_index.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert all(UNSAFE not in text for text in by_index.values()), by_index


def stream_raw(proxy: Proxy, path: str = CHAT, body: dict[str, Any] = CHAT_BODY) -> str:
    with proxy.http() as http, http.stream("POST", path, json={**body, "stream": True}) as reply:
        return "".join(reply.iter_text())


@pytest.mark.parametrize(
    "choices",
    [
        [UNSAFE_ANSWER],
        {"0": {"index": 0, "delta": {"content": UNSAFE_ANSWER}}},
        UNSAFE_ANSWER,
    ],
    ids=["string-choice", "choices-dict", "choices-string"],
)
def test_a_stream_chunk_whose_choices_are_no_list_of_objects_is_judged(
    proxy: Proxy, upstream: FakeUpstream, choices: Any
) -> None:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices}
    upstream.script = [f"data: {json.dumps(body)}\n\n".encode(), chunk("", 0, "stop"), b"data: [DONE]\n\n"]
    assert UNSAFE not in stream_raw(proxy)


def test_an_answer_whose_choice_is_no_object_is_judged(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.crafted = {**completion("fine"), "choices": [UNSAFE_ANSWER]}
    assert UNSAFE not in post(proxy, CHAT, CHAT_BODY).text


# A JSON object that says two things: Python and JavaScript read the last key, other parsers the first.
TWO_READINGS = f'{{"role": "assistant", "content": "{UNSAFE_ANSWER}", "content": "fine"}}'


@pytest.mark.parametrize("path", [CHAT, f"{CHAT}/c1"])
def test_an_answer_with_a_repeated_key_is_not_passed_on(
    servers: Servers, guard: ScriptedGuard, tmp_path: Path, path: str
) -> None:
    raw = '{"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [{"index": 0, '
    raw += f'"message": {TWO_READINGS}, "finish_reason": "stop"}}]}}'
    proxy = before(servers, guard, tmp_path, raw.encode(), {})
    with proxy.http() as http:
        reply = http.request("POST" if path == CHAT else "GET", path, json=CHAT_BODY if path == CHAT else None)
    assert reply.status_code == 502 and UNSAFE not in reply.text


def test_a_stream_chunk_with_a_repeated_key_is_not_passed_on(proxy: Proxy, upstream: FakeUpstream) -> None:
    raw = '{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, '
    raw += f'"delta": {TWO_READINGS}, "finish_reason": null}}]}}'
    upstream.script = [f"data: {raw}\n\n".encode(), chunk("", 0, "stop"), b"data: [DONE]\n\n"]
    assert UNSAFE not in stream_raw(proxy)


# Half a surrogate pair: kept by Python and JavaScript, replaced by U+FFFD in Go, refused by Rust's serde.
LONE_SURROGATE = f'{{"role": "assistant", "content": "\\ud800 {UNSAFE_ANSWER}"}}'


def test_an_answer_with_a_lone_surrogate_is_not_passed_on(
    servers: Servers, guard: ScriptedGuard, tmp_path: Path
) -> None:
    raw = '{"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [{"index": 0, '
    raw += f'"message": {LONE_SURROGATE}, "finish_reason": "stop"}}]}}'
    proxy = before(servers, guard, tmp_path, raw.encode(), {})
    with proxy.http() as http:
        reply = http.post(CHAT, json=CHAT_BODY)
    assert reply.status_code == 502 and UNSAFE not in reply.text
    assert reply.json()["error"]["message"] == "The upstream model sent an answer the proxy cannot read."


def test_a_stream_chunk_with_a_lone_surrogate_is_not_passed_on(proxy: Proxy, upstream: FakeUpstream) -> None:
    raw = '{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, '
    raw += f'"delta": {LONE_SURROGATE}, "finish_reason": null}}]}}'
    upstream.script = [f"data: {raw}\n\n".encode(), chunk("", 0, "stop"), b"data: [DONE]\n\n"]
    text = stream_raw(proxy)
    assert UNSAFE not in text and "\\ud800" not in text
    assert text.rstrip().endswith("[DONE]")  # the stream ends as streams end, not cut by a failure


def test_an_answer_with_more_choices_than_asked_is_refused(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    many = completion("fine")
    many["choices"] = [{**many["choices"][0], "index": n} for n in range(500)]
    upstream.crafted = many
    assert post(proxy, CHAT, {**CHAT_BODY, "n": 2}).status_code == 502
    assert len(guard.judged("output")) == 0


def test_a_stream_with_more_choices_than_asked_is_cut(
    proxy: Proxy, upstream: FakeUpstream, guard: ScriptedGuard
) -> None:
    upstream.script = [*(chunk(f"word {n}", n) for n in range(500)), b"data: [DONE]\n\n"]
    raw = stream_raw(proxy)
    assert '"word 200"' not in raw
    assert '"error"' in raw and len(guard.judged("output")) <= 128  # the choices before the cut are judged


@pytest.mark.parametrize("unsafe", [True, False])
def test_a_compressed_answer_is_judged_as_it_reads(proxy: Proxy, upstream: FakeUpstream, unsafe: bool) -> None:
    # the proxy asks for identity, but an upstream may compress anyway: the answer is decoded, then judged, and
    # the client gets the decoded bytes without the content-encoding that no longer describes them
    text = UNSAFE_ANSWER if unsafe else "A calm sea at dawn."
    upstream.raw_answer = gzip.compress(json.dumps(completion(text)).encode())
    upstream.raw_encoding = "gzip"
    reply = post(proxy, CHAT, CHAT_BODY)
    assert reply.status_code == 200 and "content-encoding" not in reply.headers
    if unsafe:
        assert UNSAFE not in reply.text and reply.json()["choices"][0]["finish_reason"] == "content_filter"
    else:
        assert reply.json()["choices"][0]["message"]["content"] == text


def test_an_answer_hidden_by_zero_width_characters_is_judged(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.crafted = completion("\u200b".join(UNSAFE_ANSWER))
    assert "\u200b".join(UNSAFE) not in post(proxy, CHAT, CHAT_BODY).text


async def _endless() -> AsyncIterator[bytes]:
    for _ in range(64):
        yield b"x" * 1024


@pytest.mark.anyio
async def test_an_upstream_answer_too_large_to_hold_is_refused() -> None:
    # a hostile or broken upstream must not fill the proxy's memory: a body is read no further than its bound
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        async for piece in _endless():
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    client = HttpClient(1, Timeouts(5, 5))
    try:
        answer = await client.open("GET", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        with pytest.raises(UpstreamUnavailable, match="over 10000 bytes"):
            await Upstream.read(answer, max_bytes=10_000)
    finally:
        await client.aclose()
        server.close()
    with pytest.raises(UpstreamUnavailable, match="over 10000 bytes"):
        async for _ in sse_events(_endless(), max_event_bytes=10_000):
            pass
