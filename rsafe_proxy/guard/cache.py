"""A bounded verdict cache with a time to live, keyed by policy version, side and content."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Value = TypeVar("Value")


def _feed(digest: hashlib._Hash, part: str) -> None:
    digest.update(len(part).to_bytes(8, "little"))
    digest.update(part.encode("utf-8", "surrogatepass"))


def cache_key(*parts: str) -> str:
    """A digest of the parts; the content itself is not kept in memory twice."""
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()


def chained_keys(head: Sequence[str], items: Sequence[Sequence[str]]) -> list[str]:
    """The key of `head` followed by the first 1, 2, ... of `items` (each item several parts), in one pass:
    `chained_keys(h, items)[k]` is the key of a sequence's first k + 1 items, whatever follows them."""
    digest = hashlib.sha256()
    for part in head:
        _feed(digest, part)
    keys = []
    for item in items:
        digest.update(len(item).to_bytes(8, "little"))  # so that items of two parts never read as two items
        for part in item:
            _feed(digest, part)
        keys.append(digest.copy().hexdigest())
    return keys


class TTLCache(Generic[Value]):
    """Least-recently-used entries go first; expired entries are never returned."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[str, tuple[float, Value]] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl_s
        self._clock = clock
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Value | None:
        """The live value under `key`, or None."""
        entry = self._entries.get(key)
        if entry is None or entry[0] < self._clock():
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: str, value: Value) -> None:
        """Store `value`, evicting the least recently used entry when full."""
        if self._max == 0:
            return
        self._entries[key] = (self._clock() + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
