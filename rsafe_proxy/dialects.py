"""Which API's shapes a screened request and its answer are read with (chat, completions, Responses API): the
one place the pipeline asks, so that it branches on no API itself."""

from __future__ import annotations

from typing import Any

from rsafe_proxy import bodies, responses_api
from rsafe_proxy.bodies import ChatRequest, CompletionRequest, Kind
from rsafe_proxy.errors import UpstreamUnavailable
from rsafe_proxy.guard.conversation import Turn
from rsafe_proxy.responses_api import ResponsesRequest

Request = ChatRequest | CompletionRequest | ResponsesRequest


def validated(kind: Kind, body: dict[str, Any]) -> tuple[Request, list[Turn], str]:
    """The request checked for its kind, the turns the input screen judges, and the prompt an answer replies to."""
    if kind == "responses":
        request = responses_api.validate_responses(body)
        turns = _offered(kind, body, responses_api.request_turns(request))
        return request, turns, responses_api.request_prompt(request)
    checked = bodies.validate_chat(body) if kind == "chat" else bodies.validate_completion(body)
    return checked, _offered(kind, body, bodies.request_turns(checked)), bodies.last_prompt(checked)


def _offered(kind: Kind, body: dict[str, Any], turns: list[Turn]) -> list[Turn]:
    """`turns` after the request's other fields the model reads and the tool definitions and answer schema it
    offers the model, if any."""
    fields = bodies.request_fields(kind, body)
    turns = turns if fields is None else [fields, *turns]
    tools = bodies.offered_tools(body)
    return turns if tools is None else [tools, *turns]


def acts_upstream(kind: Kind, body: dict[str, Any]) -> bool:
    """A request that makes the provider act (hosted tools, background work) waits for its input verdict,
    whatever `input_screening` says: in parallel the provider would act on a prompt about to be blocked."""
    return responses_api.acts_upstream(body) if kind == "responses" else bodies.acts_upstream(body)


def answer(value: Any, kind: Kind) -> dict[str, Any]:
    """A generated answer the proxy can screen (its choices, or its output, a list), else UpstreamUnavailable."""
    if not isinstance(value, dict) or not isinstance(value.get("output" if kind == "responses" else "choices"), list):
        raise UpstreamUnavailable("The upstream model sent an answer the proxy cannot read.")
    return value
