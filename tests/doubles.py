"""Test doubles of the guard, and the markers every double agrees on: a scripted RSafe guard served on loopback
(tests/fake_upstream.py has the fake OpenAI-compatible upstream) and a guard engine in process.

The scripted guard is a plain Starlette app whose behaviour the tests set through attributes (`guard.delay_s =
...`) and whose records the tests read (`guard.calls`). It runs in a uvicorn thread (see serving.py), so shared
state is guarded by a lock.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# Any text carrying this is unsafe to the scripted guard.
UNSAFE = "UNSAFE-MARK"
# A prompt carrying this makes the upstream answer unsafely (with UNSAFE_ANSWER).
ASK_UNSAFE_ANSWER = "ASK-FOR-A-BAD-ANSWER"
UNSAFE_ANSWER = f"Sure. Step one: {UNSAFE} then step two, and that is all."


async def wait_connected(request: Request, seconds: float) -> bool:
    """Sleep `seconds`, watching the connection; False when the client went away meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            return False
        await asyncio.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
    return True


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
        if not await wait_connected(request, self.delay_s if self._misbehaves(side) else 0.0):
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
        from rsafe_proxy.guard.engine import EngineInfo

        self.load_s = load_s
        self.mode = mode
        self.loaded = False
        self.info = EngineInfo("slow-start", loads_model=True)

    @classmethod
    def from_settings(cls, settings: Any) -> SlowStartEngine:
        """Built from guard.options (load_s) in the guard's mode, as the in-process engines are."""
        return cls(**{**settings.options, "mode": settings.mode})

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
