"""Chat completions (POST /v1/chat/completions): the request fields the proxy reads, the turns of its messages,
a rewritten message, and the choices of its answers and chunks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic
from pydantic import Field

from rsafe_proxy.apis import fields
from rsafe_proxy.apis.choices import ChoicesAnswers, choice_index, chunk_base
from rsafe_proxy.apis.dialect import AnswerFacts, Validated, answer_facts
from rsafe_proxy.apis.messages import MAX_CHOICES, ContentPart, Open, invalid, message_text, turn_text
from rsafe_proxy.bodies import encode_json, parse_json
from rsafe_proxy.errors import InvalidRequest
from rsafe_proxy.guard.conversation import Turn

# Where a chat request keeps the text read as its turns.
_TURN_KEYS = frozenset({"messages"})


class Message(Open):
    """A chat message."""

    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(Open):
    """The fields of POST /v1/chat/completions that the proxy reads."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)


def validate_chat(body: dict[str, Any]) -> ChatRequest:
    """Check the chat request's types; InvalidRequest names the first wrong field."""
    try:
        return ChatRequest.model_validate(body)
    except pydantic.ValidationError as error:
        raise invalid(error) from None


def request_turns(request: ChatRequest) -> list[Turn]:
    """The turns the input screen judges, in order: every message whatever its role (what the caller wrote,
    the tool and function results it passes on, the assistant turns it supplies, a prefill last). A policy may
    narrow the roles (`input_roles`)."""
    turns = (
        Turn(message.role, turn_text(message.model_dump()), position)
        for position, message in enumerate(request.messages)
    )
    return [turn for turn in turns if turn.text]


def last_prompt(request: ChatRequest) -> str:
    """The user text an answer replies to (the output screen's `User:` line)."""
    users = [message_text(message.content) for message in request.messages if message.role == "user"]
    return users[-1] if users else ""


def acts_upstream(body: dict[str, Any]) -> bool:
    """True when a chat or completion request asks the provider to act while answering (web search)."""
    return body.get("web_search_options") is not None


def rewritten_message(message: dict[str, Any], instruction: str) -> dict[str, Any]:
    """A chat message whose only text is `instruction`: its content replaced, its other text (refusal,
    reasoning, a participant name, audio) dropped, its tool calls kept with empty arguments so that the tool
    results answering them still match."""
    role = message.get("role")
    kept = ("role", "tool_call_id", "name") if role == "function" else ("role", "tool_call_id")
    new: dict[str, Any] = {key: message[key] for key in kept if key in message}
    new["content"] = instruction
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        new["tool_calls"] = [_emptied(call) for call in calls]
    if isinstance(message.get("function_call"), dict):
        new["function_call"] = {"name": message["function_call"].get("name", ""), "arguments": "{}"}
    return new


def _emptied(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    name = function.get("name", "") if isinstance(function, dict) else ""
    return {**{key: call[key] for key in ("id", "type") if key in call}, "function": {"name": name, "arguments": "{}"}}


def stopped_choice(choice: Any, message: str) -> dict[str, Any]:
    """A chat choice that carries only the policy's message and finish_reason content_filter: nothing of the
    answer it replaces survives (log probabilities, annotations, audio, tool calls, reasoning, extras)."""
    new = {"role": "assistant", "content": message}
    return {"index": choice_index(choice), "message": new, "finish_reason": "content_filter", "logprobs": None}


def final_chunk(template: dict[str, Any], index: int, message: str) -> dict[str, Any]:
    """A streamed chat chunk that carries the policy's message and ends the choice with content_filter."""
    choice = {"index": index, "delta": {"content": message}, "finish_reason": "content_filter"}
    return {**chunk_base(template), "object": "chat.completion.chunk", "choices": [choice]}


def facts(value: Any) -> AnswerFacts:
    """What a chat (or completions) answer or chunk tells about itself: its finish reasons are its choices'."""
    if not isinstance(value, Mapping):
        return AnswerFacts()
    reasons = tuple(
        choice["finish_reason"]
        for choice in value.get("choices") or ()
        if isinstance(choice, Mapping) and isinstance(choice.get("finish_reason"), str)
    )
    return answer_facts(value, reasons)


class ChatDialect(ChoicesAnswers):
    """The chat completions API."""

    name = "chat"
    operation = "chat"

    def validated(self, body: dict[str, Any]) -> Validated[ChatRequest]:
        """The request checked, its messages as turns after its other fields and offered tools."""
        request = validate_chat(body)
        return Validated(request, fields.offered(_TURN_KEYS, body, request_turns(request)), last_prompt(request))

    def acts_upstream(self, body: dict[str, Any]) -> bool:
        """True for web search."""
        return acts_upstream(body)

    def rewritten(
        self, body: dict[str, Any], request: ChatRequest, judged: list[Turn], instruction: str
    ) -> dict[str, Any] | None:
        """The body with each judged message rewritten (see rewritten_message): every message has that form."""
        new = fields.rewrite_base(_TURN_KEYS, body, judged)
        positions = {turn.position for turn in judged}
        new["messages"] = [
            rewritten_message(raw, instruction) if position in positions else raw
            for position, raw in enumerate(new["messages"])
        ]
        return new

    def stored_body(self, method: str, body: bytes) -> bytes:
        """A stored completion's update (POST), as the upstream receives it: its `metadata` re-encoded and nothing
        else, so that no prompt can ride on it unjudged (an upstream that read it as a create would find none);
        no body for a fetch."""
        if method != "POST":
            return b""
        update = parse_json(body)
        if extra := set(update) - {"metadata"}:
            raise InvalidRequest("A stored chat completion's update takes `metadata` only.", param=min(extra))
        return encode_json({"metadata": update.get("metadata")})

    def facts(self, value: Any) -> AnswerFacts:
        """See facts."""
        return facts(value)

    def stopped_choice(self, choice: Any, message: str) -> dict[str, Any]:
        """See stopped_choice."""
        return stopped_choice(choice, message)

    def final_chunk(self, template: dict[str, Any], index: int, message: str) -> dict[str, Any]:
        """See final_chunk."""
        return final_chunk(template, index, message)


CHAT = ChatDialect()
