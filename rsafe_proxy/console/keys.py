"""Who a console key belongs to: the console's admin (every tenant) or one tenant. Keys are configured as
`sha256:<hex digest>` or `env:VARIABLE` (console.admin_key, console.tenant_keys); env keys are read when asked,
so a rotated variable takes effect at once."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rsafe_proxy.config import ConsoleSettings
from rsafe_proxy.policy.tenants import KeyRing, configured_digests, key_digest


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is signed in: `tenant` None is the console's admin, who sees every tenant."""

    tenant: str | None

    @property
    def is_admin(self) -> bool:
        """True for the admin key's holder."""
        return self.tenant is None

    def sees(self, tenant: str) -> bool:
        """True when this viewer may see `tenant`'s decisions, policies and playground."""
        return self.tenant is None or self.tenant == tenant

    def visible(self, tenants: Iterable[str]) -> list[str]:
        """The tenants of `tenants` this viewer may see, in their order."""
        return [tenant for tenant in tenants if self.sees(tenant)]


@dataclass(frozen=True, slots=True)
class ConsoleKeys:
    """The console's keys as digests, each with the viewer it signs in."""

    holders: tuple[tuple[bytes, Viewer], ...]

    @classmethod
    def read(cls, settings: ConsoleSettings, env: Mapping[str, str]) -> ConsoleKeys:
        """The keys `settings` configure, env keys read from `env` (an unset variable gives no key)."""
        holders = [(digest, Viewer(None)) for digest in configured_digests(_listed(settings.admin_key), env)]
        for key, tenant in settings.tenant_keys.items():
            holders += [(digest, Viewer(tenant)) for digest in configured_digests((key,), env)]
        return cls(tuple(holders))

    @property
    def ring(self) -> KeyRing:
        """Every console key, to keep them out of forwarded headers and logged queries like proxy keys."""
        return KeyRing(digest for digest, _ in self.holders)

    def holder(self, key: str) -> tuple[bytes, Viewer] | None:
        """The digest and viewer of `key`, or None; every digest is compared, with no early exit to time."""
        if not key:
            return None
        digest = key_digest(key)
        found = None
        for candidate, viewer in self.holders:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = (candidate, viewer)
        return found

    def digests_of(self, viewer: Viewer) -> list[bytes]:
        """The digests of the keys that sign `viewer` in (a session stays valid only while one of them does)."""
        return [digest for digest, holder in self.holders if holder == viewer]


def _listed(key: str | None) -> tuple[str, ...]:
    return () if key is None else (key,)
