"""Who is calling: API keys (hashed, compared in constant time) resolve to exactly one tenant."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rsafe_proxy.config import TenantSettings
from rsafe_proxy.errors import Unauthorized


@dataclass(frozen=True)
class Tenant:
    """A resolved tenant. `keyed` is True when the caller proved a proxy key (it is not sent upstream)."""

    id: str
    keyed: bool
    upstream_base_url: str | None = None
    upstream_api_key: str | None = None


def key_digest(key: str) -> bytes:
    """sha256 of a key, as stored in proxy.yaml (`sha256:<hex>`)."""
    return hashlib.sha256(key.encode()).digest()


class TenantDirectory:
    """Maps a bearer key to its tenant; the anonymous tenant (if configured) serves requests with no key.

    Raises ValueError when one key is configured for two tenants (known only once env keys are read).
    """

    def __init__(self, tenants: Sequence[TenantSettings], env: Mapping[str, str]) -> None:
        self._digests: list[tuple[bytes, TenantSettings]] = []
        self._anonymous: TenantSettings | None = None
        for tenant in tenants:
            if tenant.anonymous:
                self._anonymous = tenant
            for key in tenant.keys:
                if key.startswith("sha256:"):
                    self._digests.append((bytes.fromhex(key.removeprefix("sha256:")), tenant))
                elif value := env.get(key.removeprefix("env:")):
                    self._digests.append((key_digest(value), tenant))
        owners: dict[bytes, str] = {}
        for digest, tenant in self._digests:
            if owners.setdefault(digest, tenant.id) != tenant.id:
                raise ValueError(
                    f"tenants {owners[digest]!r} and {tenant.id!r} are given the same API key: "
                    "a key must belong to exactly one tenant"
                )
        self.missing_env = [
            key.removeprefix("env:")
            for tenant in tenants
            for key in tenant.keys
            if key.startswith("env:") and not env.get(key.removeprefix("env:"))
        ]

    @property
    def has_keys(self) -> bool:
        """True when any tenant authenticates with proxy keys."""
        return bool(self._digests)

    def resolve(self, authorization: str | None) -> Tenant:
        """The tenant for this Authorization header; Unauthorized when none matches."""
        token = None
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        if token and self._digests:
            digest = key_digest(token)
            found = None
            for candidate, tenant in self._digests:  # every digest is compared: no early exit to time
                if hmac.compare_digest(candidate, digest) and found is None:
                    found = tenant
            if found is not None:
                return _tenant(found, keyed=True)
            raise Unauthorized("Incorrect API key provided for this proxy.")
        if self._anonymous is not None:
            return _tenant(self._anonymous, keyed=False)
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <your proxy key>'.")


def _tenant(settings: TenantSettings, keyed: bool) -> Tenant:
    api_key = settings.upstream.api_key.get_secret_value() if settings.upstream.api_key else None
    return Tenant(settings.id, keyed, settings.upstream.base_url, api_key)
