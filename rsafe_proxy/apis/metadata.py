"""Whether the value under a metadata key (channels.METADATA) has the shape metadata has: only then is it
skipped. A misbehaving upstream can put text anywhere; a string where numbers belong, a sentence where a name
belongs, a list of words where log probabilities belong is judged like any other text (see channels.read).
"""

from __future__ import annotations

import re
from typing import Any

# Values made of numbers only: token counts, token ids.
_NUMBERS = frozenset({"usage", "prompt_token_ids", "token_ids"})
# Log probabilities: numbers, and strings only as the tokens they score (a token, a legacy `tokens` list, the
# keys of a legacy `top_logprobs` mapping, vLLM's `decoded_token`).
_LOGPROBS = frozenset({"logprobs", "top_logprobs", "prompt_logprobs"})
_TOKEN_KEYS = frozenset({"token", "tokens", "decoded_token"})
# Opaque to every client (encrypted reasoning, signatures, padding, a server's transfer state): never shown, so
# skipped whatever they hold.
_OPAQUE = frozenset({"encrypted_content", "signature", "obfuscation", "kv_transfer_params"})
# A name (an id, a model, a type, a status, an enum), or nothing but whitespace (a stop sequence): no sentence.
_NAME = re.compile(r"\S{0,256}|\s+")
# Deeper than any metadata nests: not the shape.
_MAX_DEPTH = 8


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float))


def _numbers(value: Any, depth: int = 0) -> bool:
    if isinstance(value, dict):
        return depth < _MAX_DEPTH and all(_numbers(element, depth + 1) for element in value.values())
    if isinstance(value, list):
        return depth < _MAX_DEPTH and all(_numbers(element, depth + 1) for element in value)
    return _scalar(value)


def _logprobs(value: Any, key: str, depth: int = 0) -> bool:
    if isinstance(value, dict):
        return depth < _MAX_DEPTH and all(_logprobs(element, name, depth + 1) for name, element in value.items())
    if isinstance(value, list):
        return depth < _MAX_DEPTH and all(_logprobs(element, key, depth + 1) for element in value)
    return _scalar(value) or (isinstance(value, str) and key in _TOKEN_KEYS)


def _names(value: Any, depth: int = 0) -> bool:
    if isinstance(value, dict):
        return depth < _MAX_DEPTH and all(_names(element, depth + 1) for element in value.values())
    if isinstance(value, list):
        return depth < _MAX_DEPTH and all(_names(element, depth + 1) for element in value)
    return _scalar(value) or (isinstance(value, str) and _NAME.fullmatch(value) is not None)


def known_shape(key: str, value: Any) -> bool:
    """Whether `value`, under the metadata key `key`, is what such a key holds, and so is skipped unjudged."""
    if key in _OPAQUE:
        return True
    if key in _NUMBERS:
        return _numbers(value)
    if key in _LOGPROBS:
        return _logprobs(value, key)
    return _names(value)
