"""LiteLLM's Generic Guardrail API (POST /beta/litellm_basic_guardrail_api), served by the proxy so that a LiteLLM
proxy can use RSafe as a guardrail with no code: the fields the proxy reads, the texts it judges, and the answer
(`NONE`, `BLOCKED`, or `GUARDRAIL_INTERVENED` with replaced texts) a decision becomes. Not a Dialect: nothing
goes upstream and nothing streams; the answer's choices it may carry are read as chat choices (apis.choices)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pydantic
from pydantic import Field

from rsafe_proxy.apis.choices import choice_text, delta_text
from rsafe_proxy.apis.messages import ContentPart, Open, call_text, invalid, turn_text
from rsafe_proxy.errors import ContentBlocked, GuardUnavailable
from rsafe_proxy.guard.conversation import Turn
from rsafe_proxy.policy.decide import Decision, Outcome

PATH = "/beta/litellm_basic_guardrail_api"


class StructuredMessage(Open):
    """A chat message LiteLLM passes along with the texts (the request side only)."""

    role: str
    content: str | list[ContentPart] | None = None


class GuardrailRequest(Open):
    """The fields of a Generic Guardrail API call that the proxy reads."""

    input_type: Literal["request", "response"]
    texts: list[str] = Field(default_factory=list)
    structured_messages: list[StructuredMessage] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    # RSafe's own LiteLLM guardrail (adapters/litellm) also sends the answer's choices as LiteLLM returned them
    # (a message each, or a window of stream deltas), so every channel is read here, by the proxy's dialect
    choices: list[dict[str, Any]] | None = None


def validate_guardrail(body: dict[str, Any]) -> GuardrailRequest:
    """Check the call's types; InvalidRequest names the first wrong field."""
    try:
        return GuardrailRequest.model_validate(body)
    except pydantic.ValidationError as error:
        raise invalid(error) from None


def input_turns(request: GuardrailRequest) -> list[Turn]:
    """What the input screen judges: every structured message LiteLLM sends, whatever its role (tool results
    and assistant turns included), then each of its texts that no message holds; without structured messages,
    the texts (as the user's)."""
    messages = request.structured_messages or []
    turns = [
        Turn(message.role, text, position)
        for position, message in enumerate(messages)
        if (text := turn_text(message.model_dump()))
    ]
    held = "\n".join(turn.text for turn in turns)
    loose = [text for text in request.texts if text and text not in held]
    return turns + [Turn("user", text, len(messages) + n) for n, text in enumerate(loose)]


def judged_texts(request: GuardrailRequest, judged: Sequence[Turn]) -> list[str]:
    """The texts of the call that the judged turns hold: those a rewrite replaces."""
    held = [turn.text for turn in judged]
    return [text for text in request.texts if text and any(text in turn for turn in held)]


def output_text(request: GuardrailRequest) -> str:
    """What the output screen judges: the answer's texts and its tool calls as `name(arguments)`; with
    `choices`, every channel of them (reasoning, refusal, audio transcripts, ...) instead of the texts."""
    if request.choices is not None:
        streamed: dict[Any, str] = {}  # a window's deltas, joined per choice as the client joins them
        for choice in request.choices:
            if "delta" in choice:
                index = choice.get("index", 0)
                streamed[index] = streamed.get(index, "") + delta_text(choice)
        answers = [choice_text(choice) for choice in request.choices if "delta" not in choice]
        return "\n".join([*answers, *streamed.values()])
    calls = [call_text(call.get("function")) for call in request.tool_calls or []]
    return "\n".join(part for part in [*request.texts, *calls] if part)


def answer(decision: Decision, request: GuardrailRequest, judged: list[str]) -> dict[str, Any]:
    """LiteLLM's action for a decision: NONE when the content passes, BLOCKED with the policy's message, or
    GUARDRAIL_INTERVENED with the judged texts (all texts, on the response side) replaced by it (rewrite)."""
    if decision.outcome.passes:
        return {"action": "NONE"}
    if decision.outcome is not Outcome.REWRITE:
        # beside LiteLLM's fields, the error the proxy itself would answer with: RSafe's guardrail reads them
        code = GuardUnavailable.code if decision.outcome is Outcome.GUARD_ERROR_BLOCK else ContentBlocked.code
        return {
            "action": "BLOCKED",
            "blocked_reason": decision.message,
            "code": code,
            "categories": [*decision.categories],
        }
    flagged = set(judged) if request.input_type == "request" else set(request.texts)
    replaced = [decision.message if text in flagged else text for text in request.texts]
    if request.input_type == "response" and not replaced:  # the answer came as `choices` only
        replaced = [decision.message]
    return {"action": "GUARDRAIL_INTERVENED", "texts": replaced}
