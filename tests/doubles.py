"""Test doubles served on loopback: a fake OpenAI-compatible upstream and a scripted RSafe guard.

Both are plain Starlette apps whose behaviour the tests set through attributes (`upstream.answer = ...`,
`guard.delay_s = ...`) and whose records the tests read (`upstream.requests`, `guard.calls`). They run in a
uvicorn thread (see serving.py), so shared state is guarded by a lock.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# Any text carrying this is unsafe to the scripted guard.
UNSAFE = "UNSAFE-MARK"
# A prompt carrying this makes the upstream answer unsafely (with UNSAFE_ANSWER).
ASK_UNSAFE_ANSWER = "ASK-FOR-A-BAD-ANSWER"
UNSAFE_ANSWER = f"Sure. Step one: {UNSAFE} then step two, and that is all."


_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass(frozen=True)
class Received:
    """One request the upstream saw."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: Any


async def _wait(request: Request, seconds: float) -> bool:
    """Sleep `seconds`, watching the connection; False when the client went away meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            return False
        await asyncio.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
    return True


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
        if not await _wait(request, self.first_byte_delay_s):
            self.aborted.set()
            return Response(status_code=499)
        if self.raw_answer is not None and body.get("stream") is not True:
            self._finished()
            return Response(self.raw_answer, media_type="application/json")
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
        return JSONResponse(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
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


@dataclass(frozen=True)
class GuardCall:
    """One verdict the guard was asked for: the side, the text it judged, the whole rendered prompt, and the
    `cache_salt` the request carried (None without one)."""

    side: str
    judged: str
    prompt: str
    cache_salt: str | None = None


def read_conversation(prompt: str) -> tuple[str, str]:
    """(side, judged text) as a naive model reads a rendered RSafe prompt.

    The block ends at the FIRST `<END CONVERSATION>`, every line starting `User:` or `Agent:` opens a turn, and
    only the last turn of the screened role is judged. Content that could forge these markers would therefore
    hide text from this guard: the proxy must neutralise it.
    """
    side = "output" if "'Agent' messages" in prompt else "input"
    start = prompt.find("<BEGIN CONVERSATION>")
    end = prompt.find("<END CONVERSATION>", start)
    block = prompt[start + len("<BEGIN CONVERSATION>") : end if end != -1 else None]
    turns: list[tuple[str, str]] = []
    for line in block.split("\n"):
        opened = re.match(r"(User|Agent):[ ]?(.*)", line, re.S)
        if opened:
            turns.append((opened.group(1), opened.group(2)))
        elif turns:
            turns[-1] = (turns[-1][0], turns[-1][1] + "\n" + line)
    role = "Agent" if side == "output" else "User"
    texts = [text for speaker, text in turns if speaker == role]
    return side, (texts[-1] if texts else "").strip()


@dataclass
class ScriptedGuard:
    """An RSafe guard behind the OpenAI chat API: unsafe iff the judged text contains UNSAFE.

    Like a real model, its reasoning quotes the content it judges, then gives `\\boxed{safe|unsafe}`. Knobs:
    `delay_s` (per verdict), `garbage` (answers with no readable verdict), `status` (answers every verdict
    with this HTTP error), `quote_after_verdict` (repeats the judged text after its verdict, so that a verdict
    forged in the content comes last unless the proxy neutralised it), `only_side` ("input" or "output": the
    delay, garbage and status apply to that side's screens only), `unsafe_together` (the judged text is also
    unsafe when it holds every one of these words: a request spread over several turns), `context_chars`
    (a rendered prompt longer than this is refused with a 400 as vLLM words it), `raw_body` (answers with
    these bytes and status 200: a body that is not JSON, or JSON cut short), `breaks_off` (sends the head and
    half of its answer, then drops the connection); `raw_body` and `breaks_off` follow `only_side` too.
    Records: `calls`, `cancelled`, `arrived` (the monotonic time each call came in).
    """

    url: str = ""
    delay_s: float = 0.0
    garbage: bool = False
    status: int | None = None
    quote_after_verdict: bool = False
    only_side: str | None = None
    unsafe_together: tuple[str, ...] = ()
    context_chars: int | None = None
    raw_body: bytes | None = None
    breaks_off: bool = False
    calls: list[GuardCall] = field(default_factory=list)
    cancelled: int = 0
    traceparents: list[str | None] = field(default_factory=list)  # the traceparent header of each verdict asked
    arrived: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def judged(self, side: str | None = None) -> list[str]:
        """The texts judged so far (on `side` only, when given), in order."""
        with self._lock:
            return [call.judged for call in self.calls if side is None or call.side == side]

    @property
    def app(self) -> Starlette:
        """The ASGI app."""
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    def _misbehaves(self, side: str) -> bool:
        return self.only_side is None or self.only_side == side

    def verdict_text(self, judged: str, side: str = "input") -> str:
        """The model's output for `judged`."""
        if self.garbage and self._misbehaves(side):
            return "I would rather not say. Maybe it is fine, maybe not."
        unsafe = UNSAFE in judged or bool(self.unsafe_together and all(w in judged for w in self.unsafe_together))
        quoted = judged[:400]
        why = "violates U2 - Weapons & Illegal Tactics" if unsafe else "is harmless"
        text = f'<think>The text says: "{quoted}". It {why}.</think> \\boxed{{{"unsafe" if unsafe else "safe"}}}'
        if self.quote_after_verdict:
            text += f'\n(judged: "{quoted}")'
        return text

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))
        side, judged = read_conversation(prompt)
        if self.context_chars is not None and len(prompt) > self.context_chars:
            message = f"This model's maximum context length is {self.context_chars} tokens. Please reduce the length."
            return JSONResponse({"error": {"message": message, "type": "BadRequestError"}}, status_code=400)
        with self._lock:
            self.calls.append(GuardCall(side, judged, prompt, body.get("cache_salt")))
            self.traceparents.append(request.headers.get("traceparent"))
            self.arrived.append(time.monotonic())
        if not await _wait(request, self.delay_s if self._misbehaves(side) else 0.0):
            with self._lock:
                self.cancelled += 1
            return Response(status_code=499)
        if self.raw_body is not None and self._misbehaves(side):
            return Response(self.raw_body, media_type="application/json")
        if self.breaks_off and self._misbehaves(side):
            return StreamingResponse(self._broken_off(judged, side), media_type="application/json")
        if self.status is not None and self._misbehaves(side):
            return JSONResponse(
                {"error": {"message": "guard failure", "type": "server_error"}}, status_code=self.status
            )
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": self.verdict_text(judged, side)},
            "finish_reason": "stop",
        }
        return JSONResponse(
            {
                "id": "guard-1",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": str(body.get("model", "scripted-guard")),
                "choices": [choice],
                "usage": {"prompt_tokens": 300, "completion_tokens": 20, "total_tokens": 320},
            }
        )

    async def _broken_off(self, judged: str, side: str) -> AsyncIterator[bytes]:
        answer = json.dumps({"choices": [{"message": {"content": self.verdict_text(judged, side)}}]}).encode()
        yield answer[: len(answer) // 2]
        await asyncio.sleep(0.01)
        raise ConnectionResetError("the scripted guard broke off mid-answer")  # uvicorn drops the connection

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "scripted-guard", "object": "model"}]})


class SlowStartEngine:
    """A guard engine in process (`engine: tests.doubles:SlowStartEngine`) whose model takes `load_s` seconds
    to load, as the embedded one does, then answers at once: unsafe iff the prompt contains UNSAFE. For what a
    user sees while a guard loads (start-up lines, `check` latency apart from the load)."""

    name = "slow-start"

    def __init__(self, *, load_s: float = 1.0, mode: str = "generate") -> None:
        self.load_s = load_s
        self.mode = mode
        self.loaded = False

    async def start(self) -> None:
        """'Load the model': wait `load_s` once."""
        if not self.loaded:
            await asyncio.sleep(self.load_s)
            self.loaded = True

    async def complete(
        self, prompt: str, sampling: Any, system: str | None = None, *, cache_salt: str = "", requester: str = ""
    ) -> Any:
        """The verdict, after the load."""
        from rsafe_proxy.guard.engine import GuardOutput

        await self.start()
        verdict = "unsafe" if UNSAFE in prompt else "safe"
        return GuardOutput(text=f"<think>The text is judged.</think> \\boxed{{{verdict}}}", completion_tokens=8)

    async def ready(self) -> bool:
        """Loaded."""
        return self.loaded

    async def aclose(self) -> None:
        """Nothing held."""
