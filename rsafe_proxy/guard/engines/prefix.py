"""Which leading tokens of guard prompts are worth keeping a key/value cache for, and those caches (LRU).

Every guard prompt of a tenant starts with the same policy, so prompts share long token prefixes. The store
learns them from the prompts themselves: when a prompt shares at least `min_tokens` leading tokens with one
seen recently (or with a stored prefix), that shared part becomes a stored prefix and the engine computes its
cache once. No template has to mark where the policy ends. Pure bookkeeping: the engine decides what a value is.

Everything is kept per salt (the engine passes a tenant's): a prompt is matched only against prompts and
prefixes of its own salt, so no tenant's screen runs faster because another tenant sent something similar.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Generic, TypeVar

V = TypeVar("V")

Tokens = tuple[int, ...]


def shared_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens the two sequences share."""
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count


class PrefixStore(Generic[V]):
    """Stored prefixes of at most `capacity` tokens in all (least recently used go first), learned from the last
    `memory` prompts. The bound is in tokens because a value's size (a key/value cache) grows with its prefix:
    prompts that share long content must not be able to fill memory."""

    def __init__(self, capacity: int, min_tokens: int = 32, memory: int = 32) -> None:
        if capacity < 1 or min_tokens < 1 or memory < 1:
            raise ValueError("capacity, min_tokens and memory must be at least 1")
        self._capacity = capacity
        self._tokens = 0
        self._min_tokens = min_tokens
        self._entries: OrderedDict[tuple[str, Tokens], V] = OrderedDict()
        self._recent: deque[tuple[str, Tokens]] = deque(maxlen=memory)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """The tokens of all stored prefixes."""
        return self._tokens

    def find(self, tokens: Sequence[int], salt: str = "") -> tuple[Tokens, V] | None:
        """The longest prefix stored under `salt` of `tokens` that leaves at least one token after it, and its value."""
        fitting = [prefix for own, prefix in self._entries if own == salt and len(prefix) < len(tokens)]
        matching = [prefix for prefix in fitting if tuple(tokens[: len(prefix)]) == prefix]
        if not matching:
            return None
        best = max(matching, key=len)
        self._entries.move_to_end((salt, best))
        return best, self._entries[(salt, best)]

    def propose(self, tokens: Sequence[int], have: int = 0, salt: str = "") -> Tokens | None:
        """A new prefix of `tokens` worth storing, or None; `tokens` is remembered for later prompts either way.

        A prefix is proposed when `tokens` shares at least `min_tokens` more leading tokens with a recent
        prompt or a stored prefix than the `have` tokens already covered by a stored one. A prompt seen before
        (the same content screened again) proposes nothing: what it shares with itself is not a policy.
        """
        prompt = tuple(tokens)
        others = [other for own, other in (*self._recent, *self._entries) if own == salt and other != prompt]
        shared = max((shared_length(prompt, other) for other in others), default=0)
        shared = min(shared, len(prompt) - 1)  # the model must still read at least one token itself
        if (salt, prompt) not in self._recent:
            self._recent.append((salt, prompt))
        if shared - have < self._min_tokens or shared > self._capacity:
            return None
        return tuple(tokens[:shared])

    def put(self, prefix: Tokens, value: V, salt: str = "") -> None:
        """Store `value` for `prefix` under `salt`, dropping the least recently used prefixes while over capacity."""
        key = (salt, prefix)
        if key not in self._entries:
            self._tokens += len(prefix)
        self._entries[key] = value
        self._entries.move_to_end(key)
        while self._tokens > self._capacity:
            (_, dropped), _ = self._entries.popitem(last=False)
            self._tokens -= len(dropped)
