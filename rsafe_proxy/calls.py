"""What the pipeline takes and gives back: one client request, and a complete or streamed reply. Plain data,
so that the HTTP surface (routes.py) and the pipeline share no framework types."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.policy.tenants import Tenant


@dataclass(frozen=True)
class Reply:
    """A complete response."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamReply:
    """A streamed response; `chunks` must be iterated to the end or closed. `ending(message)`: the event that ends
    an event stream the proxy stops before its end (a shutdown), as the stream's API ends one (None: the generic
    error event ends it, as it ends a stream the proxy does not read). `closing()`: awaited once the response is
    over, however it ended, also when its chunks were never iterated (a client gone before the first one)."""

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]
    ending: Callable[[str], bytes | None] | None = None
    closing: Callable[[], Awaitable[None]] | None = None


@dataclass(frozen=True)
class Call:
    """One client request as the pipeline sees it."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    tenant: Tenant
    policy: Policy
