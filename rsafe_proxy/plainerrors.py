"""Pydantic's validation errors told in our own plain words, at a location a person can find in their file.

A policy file is written by a compliance team, not by Python programmers: `categories.0` and "Input should be
a valid integer" are pydantic's words. Here a list entry that has an id is named by it (`categories[U2].action`),
any other by its position counted from 0 (`examples[3].text`), and each kind of mistake gets one sentence.
"""

from __future__ import annotations

import collections.abc
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic

# An id good enough to name an entry by: a plain word that cannot be read as a position.
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'")
_SHOWN_CHARS = 40

# Bounds on a number: the words, and the key of the limit in pydantic's ctx.
_BOUNDS = {
    "greater_than": ("more than", "gt"),
    "greater_than_equal": ("at least", "ge"),
    "less_than": ("less than", "lt"),
    "less_than_equal": ("at most", "le"),
}
_KINDS = {
    "string_type": "must be text",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a mapping of fields (key: value)",
    "model_type": "must be a mapping of fields (key: value)",
    "model_attributes_type": "must be a mapping of fields (key: value)",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
}
# Messages that read on from the location ("categories[U2].action must be ..."); any other follows a colon.
_CONTINUES = ("must ", "is ", "are ")


def _label(items: Any, index: int) -> str:
    """An entry's id when it has a unique, plain one; else its position."""
    if not isinstance(items, list) or not 0 <= index < len(items) or not isinstance(items[index], dict):
        return str(index)
    ident = items[index].get("id")
    if not isinstance(ident, str) or not _LABEL.fullmatch(ident) or ident.isdigit():
        return str(index)
    same = [item for item in items if isinstance(item, dict) and str(item.get("id", "")).upper() == ident.upper()]
    return ident if len(same) == 1 else str(index)


def where(location: Sequence[str | int], data: Any) -> str:
    """`location` (pydantic's loc) as a person reads it: `categories[U2].action`, `examples[0].text`."""
    text, node = "", data
    for part in location:
        if isinstance(part, int):
            text += f"[{_label(node, part)}]"
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
        else:
            text += f".{part}" if text else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text or "(top level)"


def _choices(kind: Any) -> list[Any]:
    """The types `kind` may be: Annotated and Optional unwrapped, each member of a union."""
    origin = typing.get_origin(kind)
    if origin is typing.Annotated:
        return _choices(typing.get_args(kind)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [choice for arg in typing.get_args(kind) for choice in _choices(arg) if choice is not type(None)]
    return [kind]


def _step(kind: Any, part: str | int) -> Any:
    for choice in _choices(kind):
        origin, args = typing.get_origin(choice), typing.get_args(choice)
        if isinstance(choice, type) and issubclass(choice, pydantic.BaseModel) and isinstance(part, str):
            if part in choice.model_fields:
                return choice.model_fields[part].annotation
        elif origin in (tuple, list, collections.abc.Sequence) and isinstance(part, int) and args:
            return args[0]
        elif origin in (dict, collections.abc.Mapping) and isinstance(part, str) and len(args) == 2:
            return args[1]
    return None


def field_names(model: type[pydantic.BaseModel], location: Sequence[str | int]) -> tuple[str, ...]:
    """The fields of the model found at `location` inside `model` (none when it is not a model)."""
    kind: Any = model
    for part in location:
        kind = _step(kind, part)
        if kind is None:
            return ()
    for choice in _choices(kind):
        if isinstance(choice, type) and issubclass(choice, pydantic.BaseModel):
            return tuple(choice.model_fields)
    return ()


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _shown(value: Any, hidden: bool = False) -> str:
    """The value found, as the file wrote it: '(got 'blok')', '(got 8)', '(got a list)'."""
    if hidden and value is not None:
        return "(the value is not shown)"
    if value is None:
        return "(the value is empty)"
    if isinstance(value, bool):
        return f"(got {str(value).lower()})"
    if isinstance(value, int | float):
        return f"(got {_number(value)})"
    if isinstance(value, str):
        text = value if len(value) <= _SHOWN_CHARS else value[: _SHOWN_CHARS - 1] + "…"
        return f"(got {text!r})"
    if isinstance(value, list):
        return "(got a list)"
    if isinstance(value, dict):
        return "(got a mapping)"
    return ""


def _unknown_field(name: str, known: Sequence[str]) -> str:
    public = [field for field in known if not field.startswith("_")]
    close = difflib.get_close_matches(name, public, n=1)
    if close:
        return f"is not a known field (did you mean {close[0]!r}?)"
    return f"is not a known field (the fields here are: {', '.join(public)})" if public else "is not a known field"


def _sentence(error: Mapping[str, Any], location: Sequence[str | int], model: type[pydantic.BaseModel]) -> str:
    """The mistake in one plain sentence, without the location."""
    kind, ctx, found = str(error["type"]), error.get("ctx") or {}, error.get("input")
    # a key written in the wrong place is still a key: it must not reach a log
    hidden = any(isinstance(part, str) and part.endswith(("key", "keys")) for part in location)
    if kind == "extra_forbidden":
        return _unknown_field(str(location[-1]), field_names(model, location[:-1]))
    if kind == "missing":
        return "is required"
    if kind in ("too_short", "string_too_short"):
        least = ctx.get("min_length", 1)
        if least == 1:
            return "must not be empty"
        return f"must list at least {least} items" if kind == "too_short" else f"must be at least {least} characters"
    if kind == "too_long":
        return f"must list at most {ctx.get('max_length')} items"
    if kind == "string_too_long":
        length = f" (it has {len(found)})" if isinstance(found, str) else ""
        return f"must be at most {ctx.get('max_length')} characters{length}"
    if kind in ("literal_error", "enum"):
        message = "must be one of: " + ", ".join(_QUOTED.findall(str(ctx.get("expected", ""))))
    elif kind in _BOUNDS:
        words, key = _BOUNDS[kind]
        message = f"must be {words} {_number(ctx.get(key))}"
    elif kind == "string_pattern_mismatch":
        message = f"must match the pattern {ctx.get('pattern')}"
    elif kind in _KINDS:
        message = _KINDS[kind]
        if kind == "string_type" and isinstance(found, int | float):  # a bool is an int too: yes, no, on, off
            return f"{message} {_shown(found, hidden)}: write it in quotes"
    else:
        # our own validators' words, or pydantic's words for a case not listed above
        text = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return re.sub(r"^(?:Input|String|Value|Tuple|List|Dictionary|Object) should ", "must ", text)
    return f"{message} {_shown(found, hidden)}".rstrip()


def plain(error: Mapping[str, Any], location: Sequence[str | int], data: Any, model: type[pydantic.BaseModel]) -> str:
    """One pydantic error as `location message`, e.g. `categories[U2].action must be one of: block, ... (got 'x')`.

    `location` is the error's loc, extended by an InvalidPart's own; `data` is the document it was found in."""
    sentence = _sentence(error, location, model)
    joint = " " if sentence.startswith(_CONTINUES) else ": "
    return f"{where(location, data)}{joint}{sentence}"
