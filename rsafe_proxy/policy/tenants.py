"""Who is calling: API keys (hashed, compared in constant time) resolve to exactly one tenant."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
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


_BEARER = re.compile(r"\s*bearer\s+(.+?)\s*", re.IGNORECASE | re.DOTALL)


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Bearer <token>` (any case, any whitespace), else None."""
    matched = _BEARER.fullmatch(authorization) if authorization else None
    return matched.group(1) if matched else None


def configured_digests(keys: Iterable[str], env: Mapping[str, str]) -> list[bytes]:
    """The digests of configured keys (`sha256:<hex>`, or `env:VAR` read from `env`; an unset VAR gives none)."""
    digests = []
    for key in keys:
        if key.startswith("sha256:"):
            digests.append(bytes.fromhex(key.removeprefix("sha256:")))
        elif value := env.get(key.removeprefix("env:")):
            digests.append(key_digest(value))
    return digests


class KeyRing:
    """A set of key digests: is a token one of them, and does a header or query value carry one anywhere?"""

    def __init__(self, digests: Iterable[bytes]) -> None:
        self.digests = tuple(digests)

    def __bool__(self) -> bool:
        return bool(self.digests)

    def holds(self, token: str | None) -> bool:
        """True when `token` is one of the keys; every digest is compared, with no early exit to time."""
        if not token or not self.digests:
            return False
        digest = key_digest(token)
        found = False
        for candidate in self.digests:
            found |= hmac.compare_digest(candidate, digest)
        return found

    def carried_by(self, value: str) -> bool:
        """True when `value`, or one of its words (`Bearer <key>`, `Token <key>`, `a, <key>`, `k=<key>`), is a
        key. Words are split twice, with and without `=`/`:`/quotes as separators: a key may hold those."""
        if not self.digests:
            return False
        words = {value.strip(), *re.split(r"[\s,;]+", value), *re.split(r"[\s,;=:&\"']+", value)}
        return any(self.holds(word) for word in words if word)


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
            self._digests += [(digest, tenant) for digest in configured_digests(tenant.keys, env)]
        self.keys = KeyRing(digest for digest, _ in self._digests)
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
        token = bearer_token(authorization)
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
