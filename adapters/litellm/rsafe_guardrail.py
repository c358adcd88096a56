"""RSafe Proxy as a LiteLLM Python guardrail, with the proxy's own HTTP contract inside LiteLLM.

LiteLLM's `generic_guardrail_api` already calls RSafe Proxy with no code (see examples/litellm/). This class is
for LiteLLM deployments that want RSafe Proxy's behaviour rather than LiteLLM's generic one:

- a blocked prompt is an HTTP 400 whose OpenAI error has `code: "content_filter"` (and the violated
  categories), as the proxy answers it; a guard that fails, or a proxy that cannot be reached, is an HTTP 503
  `guard_unavailable` (the tenant's `on_guard_error: block`);
- a blocked answer keeps HTTP 200: the choice is replaced by the policy's message, `finish_reason:
  "content_filter"`;
- a streamed answer is held back in windows that grow as the proxy's do (about a sentence first, then each
  twice the one before, up to `window_chars`); each window is released only after the whole answer so far
  has passed, so unsafe text never reaches the client.

Where the text of a message, a choice or a stream chunk lives (content, refusal, reasoning, tool-call
arguments, audio transcripts, a provider's extras), where windows end, and what a replaced answer keeps are
the proxy's own code (`rsafe_proxy`, installed in LiteLLM's environment: `pip install "rsafe-proxy[litellm]"`),
so the guardrail judges exactly what the proxy judges. The verdicts come from RSafe Proxy's
`POST /beta/litellm_basic_guardrail_api`, so the tenant's policy, the verdict cache and the decision spans are
the proxy's. Put this file next to LiteLLM's config and reference it (examples/litellm/python-guardrail.yaml):

    guardrails:
      - guardrail_name: rsafe
        litellm_params:
          guardrail: rsafe_guardrail.RSafeGuardrail
          mode: [pre_call, post_call]
          default_on: true
          api_base: http://rsafe-proxy:8080        # or RSAFE_PROXY_URL
          api_key: os.environ/RSAFE_PROXY_KEY       # the tenant's proxy key, if tenants have keys
"""

# No `from __future__ import annotations`: LiteLLM loads this file without registering it in sys.modules, and
# dataclasses cannot then resolve string annotations.
import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.proxy._types import ProxyException
from litellm.types.guardrails import GuardrailEventHooks
from litellm.types.utils import Choices, ModelResponseStream

from rsafe_proxy.apis import CHAT
from rsafe_proxy.apis.chat import rewritten_message
from rsafe_proxy.apis.guardrail import PATH
from rsafe_proxy.apis.messages import turn_text
from rsafe_proxy.errors import ContentBlocked, ContentTooLong, GuardUnavailable, ProxyError
from rsafe_proxy.policy.schema import StreamSettings
from rsafe_proxy.windowplan import ChoiceText, WindowPlan

# The proxy's own defaults for a policy's stream windows (policy `stream.first_window_chars`, `window_chars`).
FIRST_WINDOW_CHARS = StreamSettings().first_window_chars
WINDOW_CHARS = StreamSettings().window_chars


class RSafeError(ProxyException):  # type: ignore[misc,unused-ignore]  # LiteLLM is untyped where it is absent
    """A proxy error as LiteLLM's proxy answers it: the status of the proxy's error class, and its OpenAI error
    body as is. LiteLLM's own body puts the status where the OpenAI `code` belongs; this one keeps the proxy's
    code (`content_filter`, `guard_unavailable`) there."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(
            message=error.message,
            type=error.type,
            param=error.param,
            code=error.status,
            openai_code=error.code,
            headers=error.headers(),
        )
        self.error = error

    def to_dict(self) -> dict[str, Any]:
        """The `error` object of the body: the proxy's, unchanged."""
        body: dict[str, Any] = self.error.body()["error"]
        return body


def _plain(value: Any) -> dict[str, Any]:
    """A LiteLLM object (a pydantic model) or a dict as plain JSON data, as a client would read it."""
    dumped = value.model_dump(mode="json", exclude_none=True) if hasattr(value, "model_dump") else value
    return dumped if isinstance(dumped, dict) else {}


def _blocked(verdict: dict[str, Any]) -> ProxyError | None:
    """What a verdict stops content with: the policy's block (or rewrite), a failed guard, or None (it passes)."""
    action = verdict.get("action")
    if action not in ("BLOCKED", "GUARDRAIL_INTERVENED"):
        return None
    message = str(verdict.get("blocked_reason") or "".join(verdict.get("texts") or []))
    if verdict.get("code") == GuardUnavailable.code:
        return GuardUnavailable(message)
    if verdict.get("code") == ContentTooLong.code:  # more guard calls than one request may make: 413, as the proxy
        return ContentTooLong(message)
    categories = verdict.get("categories")
    return ContentBlocked(message, [str(item) for item in categories] if isinstance(categories, list) else [])


@dataclass
class _Stream:
    """A streamed answer as windows: the chunks held back, each choice's text, and the window plan."""

    plan: WindowPlan
    reader: Any = field(default_factory=CHAT.reader)  # the chat dialect's reader of chunks
    held: list[Any] = field(default_factory=list)
    choices: dict[int, ChoiceText] = field(default_factory=dict)  # the proxy's own per-choice window text
    template: dict[str, Any] = field(default_factory=dict)
    closed: int = 0  # windows closed: the next one's number in the plan

    def add(self, chunk: Any) -> bool:
        """Hold `chunk`; whether the text it added completes the open window (see windowplan.py)."""
        self.held.append(chunk)
        data = _plain(chunk)
        self.template = self.template or data
        texts = self.reader.take(data).texts
        for index, text in texts:
            self.choices.setdefault(index, ChoiceText()).add(text)
        return any(self.plan.closes(self.closed, self.choices[index].size, text) for index, text in texts)

    def close(self) -> tuple[list[Any], dict[int, str]]:
        """Close the open window: its chunks, and each choice it added text to with its whole answer so far."""
        self.closed += 1
        released, self.held = self.held, []
        return released, {index: answer for index, choice in self.choices.items() if (answer := choice.close())}


class RSafeGuardrail(CustomGuardrail):  # type: ignore[misc,unused-ignore]  # LiteLLM is untyped where it is absent
    """Pre-call, post-call and streaming screens through RSafe Proxy's guardrail API."""

    def __init__(
        self,
        api_base: str | None = None,
        api_key: str | None = None,
        first_window_chars: int = FIRST_WINDOW_CHARS,
        window_chars: int = WINDOW_CHARS,
        timeout_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        base = api_base or os.environ.get("RSAFE_PROXY_URL") or "http://127.0.0.1:8080"
        self.url = base.rstrip("/") + PATH
        key = api_key or os.environ.get("RSAFE_PROXY_KEY")
        self.headers = {"x-api-key": key} if key else {}
        self.plan = WindowPlan(min(first_window_chars, window_chars), window_chars)
        self.timeout_s = timeout_s
        super().__init__(**kwargs)

    async def _judge(self, body: dict[str, Any]) -> dict[str, Any]:
        """The proxy's verdict on `body`; a proxy that cannot be reached or answers no verdict fails closed."""
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.post(self.url, json=body, headers=self.headers)
            response.raise_for_status()
            verdict = response.json()
        except (httpx.HTTPError, ValueError) as error:
            raise RSafeError(GuardUnavailable(f"The safety check is unavailable: {error}")) from error
        if not isinstance(verdict, dict):
            raise RSafeError(GuardUnavailable("The safety check answered no verdict."))
        return verdict

    async def _stopped(self, text: str) -> ProxyError | None:
        """What stops an answer whose text (all of it so far) is `text`, or None."""
        return _blocked(await self._judge({"input_type": "response", "texts": [text]}))

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        """Judge the request's messages, every channel of each; block with the proxy's error (400
        content_filter, 503 guard_unavailable), or rewrite the flagged messages as the proxy does."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.pre_call) is not True:
            return data
        messages = [message for message in data.get("messages") or [] if isinstance(message, dict)]
        if not messages:
            return data
        texts = [turn_text(_plain(message)) for message in messages]
        verdict = await self._judge({"input_type": "request", "texts": texts, "structured_messages": messages})
        if verdict.get("action") == "GUARDRAIL_INTERVENED":  # the judged texts come back, the flagged replaced
            replaced = verdict.get("texts") or texts
            data["messages"] = [
                rewritten_message(message, new) if new != old else message
                for message, old, new in zip(messages, texts, replaced, strict=False)
            ]
            return data
        if (error := _blocked(verdict)) is not None:
            raise RSafeError(error)
        return data

    async def async_post_call_success_hook(self, data: dict[str, Any], user_api_key_dict: Any, response: Any) -> Any:
        """Judge each choice, every channel of it; replace a stopped one with the policy's message
        (finish_reason content_filter, nothing of the answer kept); a failed guard is a 503."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.post_call) is not True:
            return response
        choices = getattr(response, "choices", None) or []
        # one text per choice, every channel of it (a provider's fields beside the choices go with the first)
        texts = CHAT.read_answer({**_plain(response), "choices": [_plain(choice) for choice in choices]}).texts
        for position, text in enumerate(texts[: len(choices)]):
            error = await self._stopped(text) if text.strip() else None
            if isinstance(error, GuardUnavailable):
                raise RSafeError(error)
            if error is not None:
                choices[position] = Choices(**CHAT.stopped_choice(_plain(choices[position]), error.message))
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: AsyncIterator[Any], request_data: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """Hold chunks back until the text they carry is judged, a window at a time; on a violation, end the
        stream with one chunk carrying the policy's message and finish_reason content_filter."""
        if self.should_run_guardrail(data=request_data, event_type=GuardrailEventHooks.post_call) is not True:
            async for chunk in response:
                yield chunk
            return
        stream = _Stream(self.plan)
        async for chunk in response:
            if stream.add(chunk):
                released, stopped = await self._window(stream)
                for out in released:
                    yield out
                if stopped:
                    return
        released, _ = await self._window(stream)
        for out in released:
            yield out

    async def _window(self, stream: _Stream) -> tuple[list[Any], bool]:
        """Close the open window and judge it: its chunks to release, or the one chunk that ends a stopped stream
        with the policy's message (a guard failure's too, as the proxy ends a stream), and whether it stopped."""
        released, work = stream.close()
        stops = await asyncio.gather(*(self._stopped(answer) for answer in work.values()))
        for index, stop in zip(work, stops, strict=True):
            if stop is not None:
                return [ModelResponseStream(**CHAT.final_chunk(stream.template, index, stop.message))], True
        return released, False
