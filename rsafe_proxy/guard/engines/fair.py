"""A queue that serves its parties in turn: tenants round-robin, and within a tenant its requesters round-robin.

A guard shared by everyone must not be taken by one caller: a long text judged in many segments queues many
calls, and a plain FIFO would run all of them before a later one-line prompt. Here each batch takes one call
from each party in rotation, so a newcomer waits for at most one call of each other party. Each batch is also
bounded in size (characters), so a newcomer waits for no more than one bounded batch.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Items queued under (tenant, requester); `take` returns a batch served round-robin across both levels."""

    def __init__(self) -> None:
        self._tenants: OrderedDict[str, OrderedDict[str, deque[T]]] = OrderedDict()
        self._size = 0
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return self._size

    def put(self, tenant: str, requester: str, item: T) -> None:
        """Queue `item` behind the requester's earlier ones; a new party joins the end of the rotation."""
        self._tenants.setdefault(tenant, OrderedDict()).setdefault(requester, deque()).append(item)
        self._size += 1
        self._ready.set()

    async def take(self, limit: int, budget: int, size: Callable[[T], int], live: Callable[[T], bool]) -> list[T]:
        """Wait for items, then return up to `limit` live ones whose sizes add up to at most `budget` (always at
        least one), one per party in turn. Items that are no longer `live` (their caller gave up) are dropped."""
        while True:
            await self._ready.wait()
            batch = self._batch(limit, budget, size, live)
            if batch:
                return batch

    def _batch(self, limit: int, budget: int, size: Callable[[T], int], live: Callable[[T], bool]) -> list[T]:
        batch: list[T] = []
        used = 0
        while len(batch) < limit and self._tenants:
            tenant, requesters = next(iter(self._tenants.items()))
            requester, items = next(iter(requesters.items()))
            item = items[0]
            if live(item) and batch and used + size(item) > budget:
                break  # it goes first in the next batch
            self._tenants.move_to_end(tenant)
            requesters.move_to_end(requester)
            items.popleft()
            self._size -= 1
            if not items:
                del requesters[requester]
            if not requesters:
                del self._tenants[tenant]
            if live(item):
                batch.append(item)
                used += size(item)
        if not self._tenants:
            self._ready.clear()
        return batch

    def drain(self) -> list[T]:
        """Every queued item, removed (for closing)."""
        items = [item for requesters in self._tenants.values() for queue in requesters.values() for item in queue]
        self._tenants.clear()
        self._size = 0
        self._ready.clear()
        return items
