"""Where generated content lives in an answer: every string a client would see in a message, a delta, an output
item or a streamed event, except known metadata; and the payloads the guard cannot read (audio, images, other
binary data), which the policy's `unjudged` setting strips or blocks.

The rule is inverted on purpose: a field is judged unless it is known not to carry text, so a channel that a
provider adds tomorrow is judged by default instead of passing unseen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rsafe_proxy.apis import metadata, payloads

# Keys whose values are never generated text: names of objects, positions, states, token statistics, opaque
# tokens the provider reads back (encrypted reasoning, signatures), padding (`obfuscation`), provider filter
# results. Log probabilities repeat the tokens of the text they belong to: that text is judged, and a replaced
# answer drops them (choices.replace_choice, responses_output.stopped). Each is skipped only while its value has
# the shape such a key holds (apis.metadata): text a misbehaving upstream puts there is judged.
METADATA = frozenset(
    {
        "id",
        "object",
        "created",
        "created_at",
        "completed_at",
        "model",
        "type",
        "role",
        "index",
        "status",
        "call_id",
        "tool_call_id",
        "item_id",
        "response_id",
        "file_id",
        "container_id",
        "approval_request_id",
        "output_index",
        "content_index",
        "summary_index",
        "sequence_number",
        "finish_reason",
        "stop_reason",
        "logprobs",
        "top_logprobs",
        "prompt_logprobs",
        "prompt_token_ids",
        "token_ids",
        "expires_at",
        "encrypted_content",
        "signature",
        "obfuscation",
        "system_fingerprint",
        "service_tier",
        "usage",
        "content_filter_results",
        "prompt_filter_results",
        "kv_transfer_params",
        "output_format",
        "quality",
        "size",
        "background",
    }
)
# Free-form mappings whose keys are content too (a shell command's environment, a tool's parameters).
_MAPPINGS = frozenset({"env", "properties"})
# Keys that hold binary data wherever they appear (chat audio, images).
_BINARY_KEYS = frozenset({"data", "b64_json", "partial_image_b64"})
# (object type, key) pairs that hold binary data: a generated image, a streamed piece of audio.
_BINARY_IN = frozenset({("image_generation_call", "result"), ("response.audio.delta", "delta")})
# Deeper than any answer nests: what lies below is set apart like binary data, not walked (nor judged in part).
_MAX_DEPTH = 32
_BASE64 = re.compile(r"[A-Za-z0-9+/=_-]{256,}")
_DATA_URL = re.compile(r"data:[\w.+/-]*(;[\w.+=-]+)*;base64,", re.ASCII)


def is_metadata(key: str, value: Any) -> bool:
    """Whether `value` under `key` is metadata: a METADATA key holding what such a key holds (apis.metadata)."""
    return key in METADATA and metadata.known_shape(key, value)


def looks_binary(text: str) -> bool:
    """A base64 payload or a data: URL: no guard reads it, so a verdict on it would mean nothing."""
    return bool(_BASE64.fullmatch(text) or _DATA_URL.match(text))


@dataclass(frozen=True)
class Reading:
    """What the guard must judge in a value, where the payloads it cannot read were, and the value without them
    (the same object when there were none)."""

    texts: tuple[str, ...]
    unjudged: tuple[str, ...]
    value: Any


_Part = Literal["text", "binary", "covered"]
_DROPPED = object()


@dataclass
class _Walk:
    call: Callable[[dict[str, Any]], str] | None
    streamed: bool
    request: bool = False
    texts: list[str] = field(default_factory=list)
    unjudged: list[str] = field(default_factory=list)

    def part(self, key: str, text: str, parent: dict[str, Any]) -> _Part:
        if self.request:
            return self.request_part(key, text)
        transcript = parent.get("transcript")
        if key == "data" and not self.streamed and isinstance(transcript, str) and transcript.strip():
            # a whole audio answer: the guard judges its transcript. Streamed audio runs ahead of its transcript.
            return "covered"
        if key in _BINARY_KEYS or (str(parent.get("type")), key) in _BINARY_IN or looks_binary(text):
            return "binary"
        return "text"

    def request_part(self, key: str, text: str) -> _Part:
        # a request's text is judged wherever it sits, whatever it looks like; only a payload slot may hold
        # binary data, and what it carries as text is judged in its place (see payloads)
        if key not in payloads.PAYLOAD_KEYS:
            return "text"
        carried = payloads.payload_text(text)
        if carried is None:
            return "binary"
        if carried is text:
            return "text"
        if carried.strip():
            self.texts.append(carried)
        return "covered"

    def value(self, value: Any, path: str, key: str, parent: dict[str, Any], depth: int = 0) -> Any:
        if isinstance(value, (list, dict)) and depth > _MAX_DEPTH:
            if self.request:  # a request goes upstream as it is: what lies below is judged as its JSON
                self.texts.append(json.dumps(value, ensure_ascii=False))
                return value
            self.unjudged.append(path)
            return _DROPPED
        if isinstance(value, str):
            part = self.part(key, value, parent)
            if part == "binary":
                self.unjudged.append(path)
                return _DROPPED
            if part == "text" and value:
                self.texts.append(value)
            return value
        if isinstance(value, list):
            walked = [self.value(element, f"{path}.{n}", key, parent, depth + 1) for n, element in enumerate(value)]
            if all(new is old for new, old in zip(walked, value, strict=True)):
                return value
            return [element for element in walked if element is not _DROPPED]
        if isinstance(value, dict):
            return self.object(value, path, key, depth)
        return value

    def object(self, value: dict[str, Any], path: str, key: str, depth: int) -> dict[str, Any]:
        skipped = METADATA
        if key in _MAPPINGS:
            self.texts += [name for name in value if name]
            skipped = frozenset()
        rendered: frozenset[str] = frozenset()
        if self.call and isinstance(value.get("name"), str) and isinstance(value.get("arguments"), str):
            self.texts.append(self.call(value))  # a function call reads as name(arguments)
            rendered = frozenset({"name", "arguments"})
        changed: dict[str, Any] = {}
        for name, element in value.items():
            # metadata is skipped only in its own shape: text a misbehaving upstream puts there is judged
            if name not in rendered and (name not in skipped or not metadata.known_shape(name, element)):
                new = self.value(element, f"{path}.{name}" if path else name, name, value, depth + 1)
                if new is not element:
                    changed[name] = new
        if not changed:
            return value
        kept = {name: changed.get(name, element) for name, element in value.items()}
        return {name: element for name, element in kept.items() if element is not _DROPPED}


def read(
    value: Any, call: Callable[[dict[str, Any]], str] | None = None, streamed: bool = False, request: bool = False
) -> Reading:
    """Every string of `value` that a client would see, except metadata; binary payloads are set apart.

    `call` renders a function call (an object with `name` and `arguments`) as one text; `streamed` says the
    value is a piece of a stream, where audio data cannot be matched to the transcript judged so far; `request`
    says the value is part of a request, whose strings are text unless they sit in a payload slot and are
    binary data there (see payloads.payload_text): text that looks like base64 is judged."""
    walk = _Walk(call, streamed, request)
    new = walk.value(value, "", "", {})
    return Reading(tuple(walk.texts), tuple(walk.unjudged), value if new is _DROPPED else new)
