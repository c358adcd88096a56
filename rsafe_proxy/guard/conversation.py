"""A conversation as the input screen judges it: ordered (role, text) turns, rendered as one role-labelled
transcript so that a request split across turns is judged as a whole."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from rsafe_proxy.guard.normalise import normalise

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
# The roles a policy can switch off (`input_roles`); a turn of any other role is always judged.
ROLES: tuple[Role, ...] = get_args(Role)
# The role of what a request tells the model about its tools and its answer's schema (judged on its own).
TOOLS = "tools"
# The role of the request's other fields the model reads (a request's own chat template, RAG documents, a
# completion's suffix, a prompt template's variables): not a role a policy can switch off.
FIELDS = "fields"

# A line of content that starts like a role label would fake a turn of the transcript.
_LABEL = re.compile(r"^([ \t]*)\[([ \t]*[A-Za-z][A-Za-z ]*[ \t]*)\]", re.M)


@dataclass(frozen=True)
class Turn:
    """One turn the model will read: who wrote it, its text (as sent), and where it lives in the request.

    `position` is the index of its message or input item (-1: a request's `instructions`), so that a rewrite
    replaces the right one; several turns may share a position (a tool call and its output in one item).
    """

    role: str
    text: str
    position: int = 0


def _label(role: str) -> str:
    return {
        "tool": "tool result",
        "function": "function result",
        TOOLS: "tool definitions",
        FIELDS: "request fields",
    }.get(role, role)


def transcript(turns: Sequence[Turn]) -> str:
    """The text the guard judges for `turns`: a lone user turn as it is (as a single prompt always was);
    otherwise one `[role] text` block per turn, each turn's text normalised and unable to fake a label.

    Appending a turn appends to the transcript, so an engine's prefix cache reuses what came before.
    """
    if len(turns) == 1 and turns[0].role == "user":
        return normalise(turns[0].text)
    return "\n".join(f"[{_label(turn.role)}] {_unlabelled(normalise(turn.text))}" for turn in turns)


def _unlabelled(text: str) -> str:
    return _LABEL.sub(r"\1(\2)", text)
