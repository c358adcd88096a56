"""Who may call and under which policy, as one immutable snapshot, and the watch that builds the next one.

The runtime holds one Tenancy and swaps it by one assignment; a request reads it once and keeps it to its end,
so the tenant it resolved always has the policy of the same snapshot, whatever a reload does meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from rsafe_proxy.config import Settings, load_settings
from rsafe_proxy.filewatch import FileWatch
from rsafe_proxy.policy.loading import resolve_policy_path
from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.policy.store import PolicyStore
from rsafe_proxy.policy.tenants import TenantDirectory
from rsafe_proxy.yamlsource import FileInvalid

log = logging.getLogger("rsafe_proxy")


def policy_paths(settings: Settings) -> dict[str, Path]:
    """Each tenant's policy file."""
    base = Path(settings.base_dir)
    return {tenant.id: resolve_policy_path(tenant.policy, base) for tenant in settings.tenants}


@dataclass(frozen=True)
class Tenancy:
    """The tenants (keys, upstream overrides) and their policies, from one proxy.yaml; `config_error` says why the
    latest edit of proxy.yaml was rejected (the tenants here keep serving)."""

    directory: TenantDirectory
    policies: PolicyStore
    config_error: str | None = None

    @classmethod
    def load(cls, settings: Settings, env: Mapping[str, str]) -> Tenancy:
        """The tenancy `settings` configure; FileInvalid for a bad policy, ValueError for a key of two tenants."""
        return cls(TenantDirectory(settings.tenants, env), PolicyStore.load(policy_paths(settings)))

    def policy(self, tenant: str) -> Policy:
        """The policy of `tenant`, a tenant this snapshot's directory resolved."""
        return self.policies.get(tenant)


@dataclass(frozen=True)
class TenancyReload:
    """What one poll of the watch built: the next tenancy, the tenants whose policy is new in it (every tenant
    after a proxy.yaml reload), how many files were taken and how many edits were rejected."""

    tenancy: Tenancy
    replaced: tuple[str, ...]
    reloaded: int
    rejected: int


class TenancyWatch:
    """Watches proxy.yaml (its tenants) and every policy file by one rule (rsafe_proxy.filewatch: a file is read
    once it has settled) and builds the next Tenancy from what changed.

    Other sections of proxy.yaml (server, upstream, guard, telemetry) need a restart. A bad edit keeps the last
    good tenants or policy serving and is reported in `config_error` or the policy's error."""

    def __init__(self, source: str | None, tenancy: Tenancy, env: Mapping[str, str]) -> None:
        self._source = Path(source) if source is not None else None
        self._env = env
        self._files = FileWatch(self._watched(tenancy))

    def _watched(self, tenancy: Tenancy) -> list[Path]:
        return [*([self._source] if self._source is not None else []), *tenancy.policies.paths()]

    def poll(self, tenancy: Tenancy) -> TenancyReload | None:
        """The tenancy after the files that settled since the last poll are read (None when none did). Blocks
        on file reads: call it from a worker thread."""
        changed = set(self._files.settled())
        if not changed:
            return None
        config_rejected = 0
        if self._source is not None and self._source in changed:
            reload = self._reload_settings(tenancy)
            if reload.rejected == 0:
                return reload  # every policy was read afresh with the new tenants
            tenancy, config_rejected = reload.tenancy, reload.rejected  # its policy files may have changed too
        policies = tenancy.policies.reloaded(changed)
        rejected = policies.rejected + config_rejected
        return TenancyReload(
            replace(tenancy, policies=policies.store), policies.replaced, len(policies.replaced), rejected
        )

    def _reload_settings(self, tenancy: Tenancy) -> TenancyReload:
        assert self._source is not None
        try:
            settings = load_settings(self._source)
            fresh = Tenancy.load(settings, self._env)
        except (FileInvalid, ValueError) as error:
            log.error("proxy.yaml edit rejected, the last good tenants keep serving:\n%s", error)
            return TenancyReload(replace(tenancy, config_error=str(error)), (), 0, 1)
        self._files.follow(self._watched(fresh))
        tenants = tuple(tenant.id for tenant in settings.tenants)
        log.info("tenants reloaded from %s: %s", self._source, ", ".join(tenants))
        return TenancyReload(fresh, tenants, 1, 0)
