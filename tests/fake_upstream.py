"""A fake OpenAI-compatible upstream served on loopback (chat, completions, responses, embeddings, models).

A plain Starlette app whose behaviour the tests set through attributes (`upstream.answer = ...`) and whose
records the tests read (`upstream.requests`). It runs in a uvicorn thread (see serving.py), so shared state is
guarded by a lock.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.doubles import ASK_UNSAFE_ANSWER, UNSAFE_ANSWER, wait_connected

_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass(frozen=True)
class Received:
    """One request the upstream saw."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: Any


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text) or [text]


@dataclass
class FakeUpstream:
    """An OpenAI-compatible LLM: echoes the last user message, or answers unsafely when asked to.

    Knobs: `answer` (fixed answer text), `crafted` and `script` (a whole answer or stream sent byte for byte,
    see `script_breaks`), `fail` ((status, body): answer every generation with that error),
    `first_byte_delay_s`, `token_delay_s` (between streamed chunks), `crlf` (SSE lines end with CRLF, and each
    event's last CRLF is split across two writes, as a TCP read may split it), `answer_as` (chat answers as
    content, as the arguments of a tool call, or of a legacy `function_call`).
    `lenient` (every path it does not serve is answered with generated unsafe text), `raw_answer` (a
    non-streamed answer's bytes, sent as is with status 200: garbage or truncated JSON).
    Records: `requests` (on every path); `aborted` is set when a client (the proxy) left before the answer was
    complete.
    """

    url: str = ""
    answer: str | None = None
    fail: tuple[int, dict[str, Any]] | None = None
    first_byte_delay_s: float = 0.0
    token_delay_s: float = 0.0
    crlf: bool = False
    answer_as: Literal["content", "tool_call", "function_call"] = "content"
    crafted: dict[str, Any] | None = None  # a non-streamed answer sent as is, whatever the request
    script: list[bytes | float] | None = None  # a streamed answer: raw bytes sent as is, a float pauses that long
    script_breaks: bool = False  # after the script, the connection breaks (the chunked body never ends)
    lenient: bool = False  # paths it does not serve are answered with UNSAFE_ANSWER instead of 404
    raw_answer: bytes | None = None  # a non-streamed answer sent byte for byte (200, application/json)
    raw_encoding: str | None = None  # the content-encoding raw_answer is sent under (its bytes encoded so)
    requests: list[Received] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # non-streamed answers by id, as OpenAI stores
    aborted: threading.Event = field(default_factory=threading.Event)
    completed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def calls(self, path: str | None = None) -> list[Received]:
        """The requests received (on `path` only, when given)."""
        with self._lock:
            return [received for received in self.requests if path is None or received.path == path]

    @property
    def app(self) -> Starlette:
        """The ASGI app."""
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/responses/{id}", self._stored, methods=["GET", "DELETE"]),
                Route("/v1/chat/completions/{id}", self._stored, methods=["GET"]),
                Route("/v1/chat/completions", self._stored_list, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/responses/{id}/cancel", self._stored, methods=["POST"]),
                Route("/v1/chat/completions/{id}", self._updated, methods=["POST", "DELETE"]),
                Route("/{rest:path}", self._elsewhere, methods=_EVERY_METHOD),
            ]
        )

    async def _record(self, request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        received = Received(request.method, request.url.path, request.url.query, dict(request.headers), body)
        with self._lock:
            self.requests.append(received)
        return body

    def _text_for(self, prompt: str) -> str:
        if self.answer is not None:
            return self.answer
        return UNSAFE_ANSWER if ASK_UNSAFE_ANSWER in prompt else f"Echo: {prompt}"

    def _finished(self) -> None:
        with self._lock:
            self.completed += 1

    async def _generate(self, request: Request, body: Any, kind: str) -> Response:
        if self.fail is not None:
            status, error = self.fail
            return JSONResponse(error, status_code=status, headers={"x-upstream-error": "yes", "retry-after": "7"})
        if not await wait_connected(request, self.first_byte_delay_s):
            self.aborted.set()
            return Response(status_code=499)
        if self.raw_answer is not None and body.get("stream") is not True:
            self._finished()
            encoded = {"content-encoding": self.raw_encoding} if self.raw_encoding else None
            return Response(self.raw_answer, media_type="application/json", headers=encoded)
        if self.crafted is not None and body.get("stream") is not True:
            self._finished()
            return JSONResponse(self.crafted)
        if self.script is not None and body.get("stream") is True:
            return StreamingResponse(self._scripted(list(self.script)), media_type="text/event-stream")
        prompt = _last_prompt(body, kind)
        text = self._text_for(prompt)
        model = str(body.get("model", "fake-model"))
        if body.get("stream") is True:
            events = self._response_events(text, model) if kind == "responses" else self._stream(text, model, kind)
            return StreamingResponse(events, media_type="text/event-stream")
        self._finished()
        if kind == "responses":
            return JSONResponse(self._store(_response(model, "completed", [self._output_item(text)])))
        if kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", **self._delta(text, first=True)},
                "finish_reason": "stop",
            }
            answer = self._store(_envelope("chat.completion", model, choice))
            return JSONResponse(answer, headers={"x-request-id": "req-upstream"})
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        return JSONResponse(_envelope("text_completion", model, choice), headers={"x-request-id": "req-upstream"})

    def _delta(self, text: str, first: bool) -> dict[str, Any]:
        """A chat message or delta carrying `text` as `answer_as` says (names and ids on the first piece)."""
        function = {"name": "lookup", "arguments": text} if first else {"arguments": text}
        if self.answer_as == "tool_call":
            call: dict[str, Any] = {"index": 0, "function": function}
            if first:
                call.update(id="call_1", type="function")
            return {"content": None, "tool_calls": [call]}
        if self.answer_as == "function_call":
            return {"content": None, "function_call": function}
        return {"content": text}

    async def _stream(self, text: str, model: str, kind: str) -> AsyncIterator[bytes]:
        end = b"\r\n\r\n" if self.crlf else b"\n\n"
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def event(payload: dict[str, Any] | str) -> bytes:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            return b"data: " + data.encode() + end

        def piece(word: str, finish: str | None, first: bool = False) -> dict[str, Any]:
            if kind == "chat":
                delta = self._delta(word, first) if word else {}
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": word, "finish_reason": finish, "logprobs": None}

        events: list[dict[str, Any] | str] = []
        if kind == "chat":
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            events.append(_envelope(obj, model, role))
        events += [_envelope(obj, model, piece(word, None, n == 0)) for n, word in enumerate(_words(text))]
        events += [_envelope(obj, model, piece("", "stop")), "[DONE]"]
        async for raw in self._paced([event(payload) for payload in events]):
            yield raw

    async def _scripted(self, script: list[bytes | float]) -> AsyncIterator[bytes]:
        for step in script:
            if isinstance(step, bytes):
                yield step
            else:
                await asyncio.sleep(step)
        if self.script_breaks:  # uvicorn drops the connection mid-body, as a crashed or cut-off server does
            raise ConnectionAbortedError("the scripted upstream broke off")

    async def _paced(self, events: list[bytes]) -> AsyncIterator[bytes]:
        """Send the events `token_delay_s` apart (after the first two); note whether the client took them all."""
        complete = False
        try:
            for position, raw in enumerate(events):
                if position > 1:
                    await asyncio.sleep(self.token_delay_s)
                if self.crlf:  # the last "\r\n" split across two writes, as a TCP read may split it
                    yield raw[:-1]
                    await asyncio.sleep(0.002)
                    yield raw[-1:]
                else:
                    yield raw
            complete = True
        finally:
            if complete:
                self._finished()
            else:
                self.aborted.set()

    def _output_item(self, text: str) -> dict[str, Any]:
        """A Responses API output item carrying `text`: a message, or a function call (`answer_as`)."""
        if self.answer_as != "content":
            return {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup", "arguments": text}
        part = {"type": "output_text", "text": text, "annotations": []}
        return {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": [part]}

    async def _response_events(self, text: str, model: str) -> AsyncIterator[bytes]:
        """A Responses API stream: created, the item and its part, one delta per word, the dones, completed."""
        item = self._output_item(text)
        function = item["type"] == "function_call"
        empty = {**item, "arguments": ""} if function else {**item, "status": "in_progress", "content": []}
        delta_type = "response.function_call_arguments.delta" if function else "response.output_text.delta"
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": _response(model, "in_progress", [])},
            {"type": "response.output_item.added", "output_index": 0, "item": empty},
        ]
        if not function:
            part = {"type": "output_text", "text": "", "annotations": []}
            events.append(
                {
                    "type": "response.content_part.added",
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "part": part,
                }
            )
        position = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        events += [{"type": delta_type, **position, "delta": word} for word in _words(text)]
        events += [
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": _response(model, "completed", [item])},
        ]
        end = "\r\n\r\n" if self.crlf else "\n\n"
        raws = [
            f"event: {event['type']}\ndata: {json.dumps({**event, 'sequence_number': number})}{end}".encode()
            for number, event in enumerate(events)
        ]
        async for raw in self._paced(raws):
            yield raw

    def _store(self, answer: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.stored[str(answer["id"])] = answer
        return answer

    async def _stored(self, request: Request) -> Response:
        await self._record(request)
        answer = self.stored.get(request.path_params["id"])
        if answer is None:
            return JSONResponse({"error": {"message": "No such object", "type": "invalid_request_error"}}, 404)
        if request.method == "DELETE":
            return JSONResponse({"id": answer["id"], "object": "response", "deleted": True})
        return JSONResponse(answer)

    async def _updated(self, request: Request) -> Response:
        """POST /v1/chat/completions/{id} sets the stored completion's metadata and returns it; DELETE drops it."""
        body = await self._record(request)
        with self._lock:
            answer = self.stored.get(request.path_params["id"])
            if answer is not None and request.method == "DELETE":
                del self.stored[answer["id"]]
                return JSONResponse({"id": answer["id"], "object": "chat.completion.deleted", "deleted": True})
            if answer is not None and isinstance(body, dict):
                answer["metadata"] = body.get("metadata")
        if answer is None:
            return JSONResponse({"error": {"message": "No such object", "type": "invalid_request_error"}}, 404)
        return JSONResponse(answer)

    async def _elsewhere(self, request: Request) -> Response:
        """Any other path is recorded; a `lenient` upstream answers it with generated unsafe text, as a server
        that routes loosely (case, suffixes, unknown operations) would, else it is 404."""
        await self._record(request)
        if not self.lenient:
            return JSONResponse({"error": {"message": "Unknown path", "type": "invalid_request_error"}}, 404)
        choice = {"index": 0, "message": {"role": "assistant", "content": UNSAFE_ANSWER}, "finish_reason": "stop"}
        return JSONResponse(_envelope("chat.completion", "fake-model", choice))

    async def _stored_list(self, request: Request) -> Response:
        await self._record(request)
        chats = [answer for answer in self.stored.values() if answer.get("object") == "chat.completion"]
        return JSONResponse({"object": "list", "data": chats, "has_more": False})

    async def _responses(self, request: Request) -> Response:
        return await self._generate(request, await self._record(request), "responses")

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, await self._record(request), "chat")

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, await self._record(request), "completion")

    async def _models(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse(
            {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "tests"}]}
        )

    async def _embeddings(self, request: Request) -> Response:
        await self._record(request)
        given = (await request.json()).get("input")
        inputs = given if isinstance(given, list) else [given]  # one embedding per input, as OpenAI's API
        return JSONResponse(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": n, "embedding": [0.1, 0.2]} for n in range(len(inputs))],
                "model": "fake-embed",
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )


def _envelope(obj: str, model: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {"id": "cmpl-fake", "object": obj, "created": 1_700_000_000, "model": model, "choices": [choice]}


def _response(model: str, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": 1_700_000_000,
        "status": status,
        "model": model,
        "output": output,
        "incomplete_details": None,
        "error": None,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }


def _last_prompt(body: Any, kind: str) -> str:
    if kind == "responses":
        given = body.get("input", "")
        body = {"messages": [{"role": "user", "content": given}] if isinstance(given, str) else given}
        kind = "chat"
    if kind == "completion":
        prompt = body.get("prompt", "")
        return str(prompt[-1] if isinstance(prompt, list) and prompt else prompt)
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content") or ""
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            return str(content)
    return ""
