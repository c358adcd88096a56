"""Request, answer and event bodies as JSON: one reading of the bytes (what the guard judges is what the
upstream and the client read), and their encoding."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from rsafe_proxy.errors import InvalidRequest

# A \u escape of a surrogate (paired or not: the decoded text says which)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = "The request body holds an unpaired surrogate escape (\\ud800-\\udfff)."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are unique: parsers disagree on which of two equal keys wins (the first, the last,
    an error), so a body with both could be judged in one reading and acted on in another."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise InvalidRequest(f"The request body repeats the key {key!r} in one object; send each key once.")
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    raise InvalidRequest(f"The request body holds {name}, which is not JSON.")


def _finite(number: str) -> float:
    """A number as a float, refused where it overflows: 1e999 would be re-encoded as Infinity, which is not JSON."""
    value = float(number)
    if math.isinf(value):
        raise InvalidRequest(f"The request body holds the number {number[:32]}, too large for a float.")
    return value


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or InvalidRequest saying where it breaks.

    Only one reading is accepted: UTF-8 (no BOM, no other encoding guessed from the first bytes), unique keys,
    no NaN or Infinity, no lone surrogates. What the guard judges is then re-encoded (`encode_json`) and that is
    what the upstream receives, so the two cannot read different content out of the same bytes.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not UTF-8 encoded JSON.") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as error:
        raise InvalidRequest(
            f"The request body is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})."
        ) from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply to be read.") from None
    except ValueError as error:  # e.g. an integer past Python's digit limit
        raise InvalidRequest(f"The request body cannot be read: {error}.") from None
    if _SURROGATE_ESCAPE.search(text) is not None and _has_lone_surrogate(data):
        # parsers disagree on one: kept (Python, JavaScript), replaced by U+FFFD (Go), refused (Rust)
        raise InvalidRequest(_LONE_SURROGATE)
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def _has_lone_surrogate(data: Any) -> bool:
    """Whether a string in `data` holds half a surrogate pair (a pair escaped as two \\u escapes is decoded)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except RecursionError:  # as deep as json.loads reaches, but not a frame more: not checked, so refused
        return True
    return False


def read_json(raw: bytes) -> dict[str, Any] | None:
    """An upstream answer or streamed event as parse_json reads a request, or None where it has no such reading:
    what the proxy judged is what any client parser reads out of the bytes it passes on."""
    try:
        return parse_json(raw)
    except InvalidRequest:
        return None


def compact_json(value: Any) -> bytes:
    """`value` as compact UTF-8 JSON: by orjson (about a tenth of json's CPU), or by json where orjson refuses
    (an integer past 64 bits, nesting past 254 levels; a lone surrogate: json's UnicodeEncodeError then says
    so)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encode_json(body: dict[str, Any]) -> bytes:
    """The JSON bytes of a judged body, as forwarded upstream; a lone surrogate is refused (it has no UTF-8)."""
    try:
        return compact_json(body)
    except UnicodeEncodeError:
        raise InvalidRequest(_LONE_SURROGATE) from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply to be read.") from None
