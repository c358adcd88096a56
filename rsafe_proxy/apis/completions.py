"""Completions (POST /v1/completions): the request fields the proxy reads, its prompts as turns, and the
choices of its answers and chunks."""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic import Field

from rsafe_proxy.apis import chat, fields
from rsafe_proxy.apis.choices import ChoicesAnswers, choice_index, chunk_base
from rsafe_proxy.apis.dialect import AnswerFacts, Validated
from rsafe_proxy.apis.messages import MAX_CHOICES, Open, invalid
from rsafe_proxy.errors import InvalidRequest
from rsafe_proxy.guard.conversation import Turn

# Where a completion request keeps the text read as its turns.
_TURN_KEYS = frozenset({"prompt"})


class CompletionRequest(Open):
    """The fields of POST /v1/completions that the proxy reads."""

    model: str
    prompt: str | list[str]
    stream: bool | None = False
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)


def validate_completion(body: dict[str, Any]) -> CompletionRequest:
    """Check the completion request's types; token-array prompts cannot be screened and are refused."""
    try:
        return CompletionRequest.model_validate(body)
    except pydantic.ValidationError as error:
        if isinstance(body.get("prompt"), list):
            raise InvalidRequest(
                "Invalid type for 'prompt': this proxy screens text, so 'prompt' must be a string or a list of strings "
                "(token arrays cannot be screened).",
                param="prompt",
            ) from None
        raise invalid(error) from None


def request_turns(request: CompletionRequest) -> list[Turn]:
    """The turns the input screen judges: every prompt of the completion (as the user's)."""
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    return [Turn("user", prompt, position) for position, prompt in enumerate(prompts) if prompt]


def last_prompt(request: CompletionRequest) -> str:
    """The text an answer continues (the output screen's `User:` line): the prompts joined."""
    return request.prompt if isinstance(request.prompt, str) else "\n\n".join(request.prompt)


class CompletionsDialect(ChoicesAnswers):
    """The completions API."""

    name = "completion"
    operation = "text_completion"

    def validated(self, body: dict[str, Any]) -> Validated[CompletionRequest]:
        """The request checked, its prompts as turns after its other fields and offered tools."""
        request = validate_completion(body)
        return Validated(request, fields.offered(_TURN_KEYS, body, request_turns(request)), last_prompt(request))

    def acts_upstream(self, body: dict[str, Any]) -> bool:
        """True for web search, as in chat."""
        return chat.acts_upstream(body)

    def rewritten(
        self, body: dict[str, Any], request: CompletionRequest, judged: list[Turn], instruction: str
    ) -> dict[str, Any] | None:
        """The body with its prompt (all of it: one request, one text) replaced by `instruction`."""
        new = fields.rewrite_base(_TURN_KEYS, body, judged)
        new["prompt"] = instruction
        return new

    def facts(self, value: Any) -> AnswerFacts:
        """As in chat: its finish reasons are its choices'."""
        return chat.facts(value)

    def stopped_choice(self, choice: Any, message: str) -> dict[str, Any]:
        """A completion choice that carries only the policy's message and finish_reason content_filter."""
        return {"index": choice_index(choice), "text": message, "finish_reason": "content_filter", "logprobs": None}

    def final_chunk(self, template: dict[str, Any], index: int, message: str) -> dict[str, Any]:
        """A streamed completion chunk that carries the policy's message and ends the choice."""
        base = chunk_base(template)
        choice: dict[str, Any] = {"index": index, "text": message, "finish_reason": "content_filter"}
        return {**base, "object": base.get("object", "text_completion"), "choices": [choice]}


COMPLETIONS = CompletionsDialect()
