"""RSafe Proxy as a LiteLLM Python guardrail, with the proxy's own HTTP contract inside LiteLLM.

LiteLLM's `generic_guardrail_api` already calls RSafe Proxy with no code (see the README). This class is for
LiteLLM deployments that want RSafe Proxy's behaviour rather than LiteLLM's generic one:

- a blocked prompt is an HTTP 400 with the OpenAI error body `code: "content_filter"` (not a generic error);
- a blocked answer keeps HTTP 200: the content is replaced by the policy's message, `finish_reason:
  "content_filter"`;
- a streamed answer is held back in windows and each window is released only after its verdict, so unsafe
  text never reaches the client (LiteLLM's generic hook samples every few chunks and releases in between).

The verdicts come from RSafe Proxy's `POST /beta/litellm_basic_guardrail_api`, so the tenant's policy, the
verdict cache and the decision spans are the proxy's. A guard that cannot be reached fails closed (HTTP 503
`guard_unavailable`). Put this file next to LiteLLM's config and reference it:

    guardrails:
      - guardrail_name: rsafe
        litellm_params:
          guardrail: rsafe_guardrail.RSafeGuardrail
          mode: [pre_call, post_call]
          default_on: true
          api_base: http://rsafe-proxy:8080        # or RSAFE_PROXY_URL
          api_key: os.environ/RSAFE_PROXY_KEY       # the tenant's proxy key, if tenants have keys

It imports only what a LiteLLM proxy install has (litellm, fastapi, httpx).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from typing import Any

import httpx
from fastapi import HTTPException
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.types.guardrails import GuardrailEventHooks

PATH = "/beta/litellm_basic_guardrail_api"


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def _text(content: Any) -> str:
    """A message's text: its string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text") or "") for part in content if isinstance(part, dict))
    return ""


def _get(value: Any, name: str) -> Any:
    """An attribute of a LiteLLM object or a key of a dict."""
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)


def _plain(value: Any) -> dict[str, Any]:
    """A LiteLLM object (a pydantic model) or a dict as plain JSON data, for the proxy to read every channel of."""
    dumped = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return dumped if isinstance(dumped, dict) else {}


# What a replaced answer must not keep: every channel besides the policy's message (the proxy judged them all).
_CHANNELS = ("tool_calls", "function_call", "reasoning_content", "thinking_blocks", "audio", "annotations", "refusal")


def _emptied(message: Any, text: str) -> None:
    """`message` (a message or a delta) with the policy's message as its only content."""
    message.content = text
    for name in _CHANNELS:
        if getattr(message, name, None) is not None:
            setattr(message, name, None)


def _calls(tool_calls: Any) -> list[dict[str, Any]]:
    """Tool calls as the guardrail API takes them: {"function": {"name", "arguments"}}."""
    calls = []
    for call in tool_calls or []:
        function = _get(call, "function")
        calls.append(
            {"function": {"name": _get(function, "name") or "", "arguments": _get(function, "arguments") or ""}}
        )
    return calls


class RSafeGuardrail(CustomGuardrail):
    """Pre-call, post-call and streaming screens through RSafe Proxy's guardrail API."""

    def __init__(
        self,
        api_base: str | None = None,
        api_key: str | None = None,
        window_chars: int = 600,
        timeout_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        base = api_base or os.environ.get("RSAFE_PROXY_URL") or "http://127.0.0.1:8080"
        self.url = base.rstrip("/") + PATH
        key = api_key or os.environ.get("RSAFE_PROXY_KEY")
        self.headers = {"x-api-key": key} if key else {}
        self.window_chars = window_chars
        self.timeout_s = timeout_s
        super().__init__(**kwargs)

    async def _judge(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.post(self.url, json=body, headers=self.headers)
            response.raise_for_status()
            answer = response.json()
        except (httpx.HTTPError, ValueError) as error:
            raise HTTPException(
                503, detail=_error(f"The guard is unavailable: {error}", "guard_unavailable")
            ) from error
        return answer if isinstance(answer, dict) else {"action": "BLOCKED", "blocked_reason": "Unreadable verdict."}

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> Any:
        """Judge the request's messages; block with a 400 content_filter, or rewrite the flagged ones."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.pre_call) is not True:
            return data
        messages = [message for message in data.get("messages") or [] if isinstance(message, dict)]
        if not messages:
            return data
        texts = [_text(message.get("content")) for message in messages]
        body = {"input_type": "request", "texts": texts, "structured_messages": messages}
        verdict = await self._judge(body)
        if verdict.get("action") == "BLOCKED":
            raise HTTPException(400, detail=_error(str(verdict.get("blocked_reason") or ""), "content_filter"))
        if verdict.get("action") == "GUARDRAIL_INTERVENED":
            for message, old, new in zip(messages, texts, verdict.get("texts") or [], strict=False):
                if new != old:
                    message["content"] = new
        return data

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        """Judge each choice; replace a stopped one with the policy's message (finish_reason content_filter)."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.post_call) is not True:
            return response
        for choice in getattr(response, "choices", None) or []:
            message = _get(choice, "message")
            body = {
                "input_type": "response",
                "texts": [_text(_get(message, "content"))],
                "tool_calls": _calls(_get(message, "tool_calls")),
                "choices": [_plain(choice)],
            }
            verdict = await self._judge(body)
            if verdict.get("action") in ("BLOCKED", "GUARDRAIL_INTERVENED"):
                replacement = verdict.get("blocked_reason") or "".join(verdict.get("texts") or [])
                _emptied(message, str(replacement))
                if getattr(choice, "logprobs", None) is not None:
                    choice.logprobs = None  # its tokens spell the answer that was withheld
                choice.finish_reason = "content_filter"
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict
    ) -> AsyncGenerator[Any, None]:
        """Hold chunks back until the text they carry is judged, a window at a time; on a violation, end the
        stream with one chunk carrying the policy's message and finish_reason content_filter."""
        if self.should_run_guardrail(data=request_data, event_type=GuardrailEventHooks.post_call) is not True:
            async for chunk in response:
                yield chunk
            return
        held: list[Any] = []
        deltas: list[dict[str, Any]] = []  # the window's choices, read by the proxy (every channel)
        size = 0
        async for chunk in response:
            held.append(chunk)
            for choice in getattr(chunk, "choices", None) or []:
                deltas.append(_plain(choice))
                size += len(str(deltas[-1].get("delta") or ""))
            if size >= self.window_chars:
                stopped = await self._stopped(deltas)
                if stopped is not None:
                    yield self._final(held[-1], stopped)
                    return
                for released in held:
                    yield released
                held, deltas, size = [], [], 0
        stopped = await self._stopped(deltas) if deltas else None
        if stopped is not None and held:
            yield self._final(held[-1], stopped)
            return
        for released in held:
            yield released

    async def _stopped(self, deltas: list[dict[str, Any]]) -> str | None:
        verdict = await self._judge({"input_type": "response", "texts": [], "choices": deltas})
        if verdict.get("action") in ("BLOCKED", "GUARDRAIL_INTERVENED"):
            return str(verdict.get("blocked_reason") or "".join(verdict.get("texts") or []))
        return None

    @staticmethod
    def _final(template: Any, message: str) -> Any:
        chunk = template.model_copy(deep=True)
        for choice in chunk.choices:
            _emptied(choice.delta, message)
            if getattr(choice, "logprobs", None) is not None:
                choice.logprobs = None
            choice.finish_reason = "content_filter"
        return chunk
