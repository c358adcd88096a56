"""LiteLLM's Generic Guardrail API (POST /beta/litellm_basic_guardrail_api), served by the proxy so that a LiteLLM
proxy can use RSafe as a guardrail with no code: the fields the proxy reads, the texts it judges, and the answer
(`NONE`, `BLOCKED`, or `GUARDRAIL_INTERVENED` with replaced texts) a decision becomes."""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import Field

from rsafe_proxy.bodies import SCREENED_ROLES, ContentPart, Open, call_text, invalid, message_text
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


def validate_guardrail(body: dict[str, Any]) -> GuardrailRequest:
    """Check the call's types; InvalidRequest names the first wrong field."""
    try:
        return GuardrailRequest.model_validate(body)
    except pydantic.ValidationError as error:
        raise invalid(error) from None


def input_turns(request: GuardrailRequest) -> list[str]:
    """What the input screen judges: the user, system and developer messages when LiteLLM sends them (its
    texts also hold assistant turns, which the proxy does not judge as the user's), else the texts."""
    if request.structured_messages is None:
        return [text for text in request.texts if text]
    messages = (message for message in request.structured_messages if message.role in SCREENED_ROLES)
    return [text for message in messages if (text := message_text(message.content))]


def output_text(request: GuardrailRequest) -> str:
    """What the output screen judges: the answer's texts and its tool calls as `name(arguments)`."""
    calls = [call_text(call.get("function")) for call in request.tool_calls or []]
    return "\n".join(part for part in [*request.texts, *calls] if part)


def answer(decision: Decision, request: GuardrailRequest, judged: list[str]) -> dict[str, Any]:
    """LiteLLM's action for a decision: NONE when the content passes, BLOCKED with the policy's message, or
    GUARDRAIL_INTERVENED with the judged texts (all texts, on the response side) replaced by it (rewrite)."""
    if decision.outcome.passes:
        return {"action": "NONE"}
    if decision.outcome is not Outcome.REWRITE:
        return {"action": "BLOCKED", "blocked_reason": decision.message}
    flagged = set(judged) if request.input_type == "request" else set(request.texts)
    replaced = [decision.message if text in flagged else text for text in request.texts]
    return {"action": "GUARDRAIL_INTERVENED", "texts": replaced}
