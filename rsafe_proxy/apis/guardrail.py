"""LiteLLM's Generic Guardrail API (POST /beta/litellm_basic_guardrail_api), served by the proxy so that a LiteLLM
proxy can use RSafe as a guardrail with no code: the fields the proxy reads, the texts it judges, and the answer
(`NONE`, `BLOCKED`, or `GUARDRAIL_INTERVENED` with replaced texts) a decision becomes. Not a Dialect: nothing
goes upstream and nothing streams; the answer's choices it may carry are read as chat choices (apis.choices)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pydantic
from pydantic import Field

from rsafe_proxy.apis.choices import choice_index, choice_text, delta_text
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
    # the answer's choices as LiteLLM returned them (a message each, or a window of stream deltas), which older
    # RSafe adapters sent beside the texts (adapters/litellm now judges in process): every channel is read by
    # the proxy's dialect, and never in place of the texts
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
    turns += [Turn("user", text, len(messages) + n) for n, text in enumerate(loose)]
    # the tool calls LiteLLM found in the request: the model reads them as the assistant's turn
    calls = turn_text({"tool_calls": request.tool_calls}) if request.tool_calls else ""
    return [*turns, Turn("assistant", calls, len(messages) + len(loose))] if calls else turns


def judged_texts(request: GuardrailRequest, judged: Sequence[Turn]) -> list[str]:
    """The texts of the call that the judged turns hold: those a rewrite replaces."""
    held = [turn.text for turn in judged]
    return [text for text in request.texts if text and any(text in turn for turn in held)]


def output_text(request: GuardrailRequest) -> str:
    """What the output screen judges: the answer's texts and its tool calls as `name(arguments)`, and with
    `choices` (which older RSafe adapters sent beside the texts), every channel of them too (reasoning, refusal,
    audio transcripts, ...): a text the choices do not hold is judged beside them."""
    parts: list[str] = []
    if request.choices is not None:
        streamed: dict[int, str] = {}  # a window's deltas, joined per choice as the client joins them
        for choice in request.choices:
            if "delta" in choice:
                index = choice_index(choice)  # a malformed index is read as the client reads it, never a 500
                streamed[index] = streamed.get(index, "") + delta_text(choice)
        parts += [choice_text(choice) for choice in request.choices if "delta" not in choice]
        parts += streamed.values()
    held = "\n".join(parts)
    calls = [call_text(call.get("function")) for call in request.tool_calls or []]
    parts += [part for part in [*request.texts, *calls] if part and part not in held]
    return "\n".join(part for part in parts if part)


def answer(decision: Decision, request: GuardrailRequest, judged: list[str]) -> dict[str, Any]:
    """LiteLLM's action for a decision: NONE when the content passes, BLOCKED with the policy's message, or
    GUARDRAIL_INTERVENED with the judged texts (all texts, on the response side) replaced by it (rewrite). A
    request's tool calls have no text to replace (LiteLLM takes back only texts): a rewrite of them blocks."""
    if decision.outcome.passes:
        return {"action": "NONE"}
    unreplaceable = request.input_type == "request" and bool(request.tool_calls)
    if decision.outcome is not Outcome.REWRITE or unreplaceable:
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
