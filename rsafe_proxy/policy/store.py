"""Tenants' policies as one immutable value; a reload makes a new store, and a bad edit never replaces a good
version."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from rsafe_proxy.policy.loading import load_policy
from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.yamlsource import FileInvalid, Problem

log = logging.getLogger("rsafe_proxy.policy")


@dataclass(frozen=True)
class PolicyEntry:
    """One tenant's policy file and the policy read from it; `error` says why its latest edit was rejected."""

    path: Path
    policy: Policy
    error: str | None = None


@dataclass(frozen=True)
class PolicyReload:
    """What reading changed policy files gave: the next store, the tenants whose policy it replaced, and how many
    edits it rejected."""

    store: PolicyStore
    replaced: tuple[str, ...]
    rejected: int


@dataclass(frozen=True)
class PolicyStore:
    """Policies by tenant id, frozen: a request keeps the store (and the policy) it started with."""

    entries: Mapping[str, PolicyEntry]
    reload_errors: int = 0  # edits rejected since this store's tenants were loaded

    @classmethod
    def load(cls, paths: Mapping[str, Path]) -> PolicyStore:
        """Load every tenant's policy; raises FileInvalid (start-up must stop on a bad policy)."""
        problems: list[Problem] = []
        entries = {}
        for tenant, path in paths.items():
            try:
                entries[tenant] = PolicyEntry(path, load_policy(path))
            except FileInvalid as error:
                problems.extend(error.problems)
        if problems:
            raise FileInvalid(problems)
        return cls(MappingProxyType(entries))

    def get(self, tenant: str) -> Policy:
        """The policy in force for `tenant` (KeyError for a tenant this store does not know)."""
        return self.entries[tenant].policy

    def errors(self) -> dict[str, str]:
        """Tenants whose latest edit was rejected, with why."""
        return {tenant: entry.error for tenant, entry in self.entries.items() if entry.error}

    def paths(self) -> set[Path]:
        """Every policy file the store was read from."""
        return {entry.path for entry in self.entries.values()}

    def reloaded(self, changed: Collection[Path]) -> PolicyReload:
        """The store with the policy files in `changed` read again. A file that cannot be used keeps the tenant's
        last good policy (and records why); a file whose policy keeps its version replaces nothing."""
        entries = dict(self.entries)
        replaced, rejected = [], 0
        for tenant, entry in self.entries.items():
            if entry.path not in changed:
                continue
            try:
                policy = load_policy(entry.path)
            except FileInvalid as error:
                entries[tenant] = replace(entry, error=str(error))
                rejected += 1
                log.error("policy edit rejected, tenant %s keeps version %s:\n%s", tenant, entry.policy.version, error)
                continue
            if policy.version == entry.policy.version:
                entries[tenant] = replace(entry, error=None)
                continue
            entries[tenant] = PolicyEntry(entry.path, policy)
            replaced.append(tenant)
            log.info("tenant %s now uses policy %s version %s", tenant, policy.id, policy.version)
        store = PolicyStore(MappingProxyType(entries), self.reload_errors + rejected)
        return PolicyReload(store, tuple(replaced), rejected)
