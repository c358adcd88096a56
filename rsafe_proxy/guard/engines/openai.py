"""The `openai` engine: any OpenAI-compatible chat server hosting the guard (e.g. `vllm serve`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Self

from rsafe_proxy import http_client
from rsafe_proxy.bodies import compact_json
from rsafe_proxy.guard.engine import (
    EngineInfo,
    EngineSettings,
    GuardContextExceeded,
    GuardEngineError,
    GuardOutput,
    Sampling,
    chat_messages,
)
from rsafe_proxy.tracecontext import inject

# How OpenAI (`context_length_exceeded`) and vLLM ("maximum context length", "maximum model length") say that a
# prompt, or a prompt and its max_tokens, does not fit the model.
_CONTEXT_EXCEEDED = re.compile(r"context.length|maximum model length|max_model_len", re.I)
# A guard's answer is a verdict and its reasoning: one larger than this is read no further.
_MAX_ANSWER_BYTES = 16 * 1024 * 1024


def message_text(message: Mapping[str, Any]) -> str:
    """The model's output as one text: the content, after the reasoning in `<think>` tags where the server split
    the reasoning off (vLLM with `--reasoning-parser`, as for gpt-oss: `reasoning_content`, `reasoning` in newer
    versions), so that every family's reader sees both, as in a plain completion."""
    content = str(message["content"] or "")
    for key in ("reasoning_content", "reasoning"):
        reasoning = message.get(key)
        if isinstance(reasoning, str) and reasoning:
            return f"<think>\n{reasoning}\n</think>\n{content}"
    return content


class OpenAIEngine:
    """One user message per screen (after the family's system message, if any), sent to `{url}/chat/completions`."""

    name = "openai"

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_connections: int = 64,
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._model = model
        self._url = url.rstrip("/")
        self.info = EngineInfo("openai", model, url)  # served elsewhere: nothing to load here
        timeouts = http_client.Timeouts(timeout_s, min(timeout_s, 5.0))
        self._client = http_client.HttpClient(max_connections, timeouts, headers)

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Self:
        """The engine for `guard.url` and `guard.model` (default `rsafe`); ValueError without a url."""
        if not settings.url:
            raise ValueError("guard.url (RSAFE_GUARD_URL) is required by the openai guard engine")
        return cls(
            settings.url,
            settings.model or "rsafe",
            api_key=settings.api_key,
            timeout_s=settings.timeout_s,
            max_connections=settings.max_connections,
        )

    async def start(self) -> None:
        """Nothing to load: the guard is served elsewhere (`ready()` tells when it answers)."""

    async def complete(
        self, prompt: str, sampling: Sampling, system: str | None = None, *, cache_salt: str = "", requester: str = ""
    ) -> GuardOutput:
        """Send the rendered prompt as the user message and return the model's text. `cache_salt` goes with it
        (vLLM keeps prefix-cache blocks of different salts apart); the server schedules requests itself."""
        payload: dict[str, Any] = {
            "model": self._model,
            "messages": chat_messages(prompt, system),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            # vLLM's name for it; OpenAI-compatible servers ignore fields they do not know
            "repetition_penalty": sampling.repetition_penalty,
        }
        if cache_salt:  # vLLM refuses an empty one
            payload["cache_salt"] = cache_salt
        if self._client.closed:
            raise GuardEngineError("the openai engine is closed")
        headers = {"content-type": "application/json"}
        inject(headers)  # the guard server's spans join the proxy's guard call span
        try:
            encoded = compact_json(payload)
        except UnicodeEncodeError:  # half a surrogate pair (bodies.parse_json refuses those): judged as a failure
            raise GuardEngineError("the text to judge holds an unpaired surrogate, which JSON cannot carry") from None
        try:
            status, raw = await self._post("/chat/completions", encoded, headers)
        except http_client.RequestTimedOut as error:
            raise GuardEngineError(f"guard server timed out: {error.cause}") from error
        except http_client.RequestFailed as error:
            raise GuardEngineError(f"guard server unreachable: {error.cause}") from error
        text = raw.decode("utf-8", "replace")
        if status in (400, 413, 422) and _CONTEXT_EXCEEDED.search(text):
            raise GuardContextExceeded(f"the guard server's context is too short: {text[:200]}")
        if status != 200:
            raise GuardEngineError(f"guard server answered {status}: {text[:200]}")
        try:
            body: dict[str, Any] = json.loads(raw)
            choice = body["choices"][0]
            text = message_text(choice["message"])
            usage = body.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}  # vLLM fills it with --enable-prompt-tokens-details
            output = GuardOutput(
                text=text,
                completion_tokens=int(usage.get("completion_tokens") or 0),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                truncated=choice.get("finish_reason") == "length",
                cached_tokens=int(details.get("cached_tokens") or 0),
                model=body["model"] if isinstance(body.get("model"), str) else None,
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
            raise GuardEngineError(f"guard server sent an unexpected body: {text[:200]}") from error
        return output

    async def _post(self, path: str, content: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST to the guard server: its status and whole body (AnswerTooLarge past _MAX_ANSWER_BYTES)."""
        answer = await self._client.open("POST", f"{self._url}{path}", headers, content)
        try:
            return answer.status_code, await answer.read(_MAX_ANSWER_BYTES)
        finally:
            await answer.aclose()

    async def ready(self) -> bool:
        """True when the server lists its models."""
        if self._client.closed:
            return False
        try:
            answer = await self._client.open("GET", f"{self._url}/models", timeouts=http_client.Timeouts(5.0, 5.0))
        except http_client.RequestFailed:
            return False
        await answer.aclose()
        return answer.status_code == 200

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
