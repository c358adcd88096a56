"""Tenants' policies in memory, reloaded when their files change; a bad edit never replaces a good version."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rsafe_proxy.policy.loading import load_policy
from rsafe_proxy.policy.schema import Policy
from rsafe_proxy.yamlsource import FileInvalid, Problem

log = logging.getLogger("rsafe_proxy.policy")


_Stamp = tuple[int, int, int]
_MISSING: _Stamp = (-1, -1, -1)


def _stamp(path: Path) -> _Stamp:
    try:
        stat = os.stat(path)
    except OSError:
        return _MISSING
    # the inode too: an editor that saves by renaming a new file over the old one may keep mtime and size
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


@dataclass
class _Entry:
    path: Path
    policy: Policy
    stamp: _Stamp
    error: str | None = None
    changing: _Stamp | None = None  # seen changed by the latest call: read once it stays so


@dataclass
class PolicyStore:
    """Policies by tenant id. `get` returns an immutable snapshot: a request keeps the one it started with."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    reload_errors: int = 0

    @classmethod
    def load(cls, paths: Mapping[str, Path]) -> PolicyStore:
        """Load every tenant's policy; raises FileInvalid (start-up must stop on a bad policy)."""
        problems: list[Problem] = []
        entries = {}
        for tenant, path in paths.items():
            try:
                entries[tenant] = _Entry(path, load_policy(path), _stamp(path))
            except FileInvalid as error:
                problems.extend(error.problems)
        if problems:
            raise FileInvalid(problems)
        return cls(entries)

    def get(self, tenant: str) -> Policy:
        """The policy now in force for `tenant`."""
        return self.entries[tenant].policy

    def errors(self) -> dict[str, str]:
        """Tenants whose latest edit was rejected, with why."""
        return {tenant: entry.error for tenant, entry in self.entries.items() if entry.error}

    def reload_changed(self) -> list[str]:
        """Reload the files that changed and have stayed unchanged since the previous call; returns the tenants
        whose policy was replaced.

        A file is read only once it has settled: an editor writing it in place could otherwise be caught
        half-way, and the first lines of a policy may well be a valid policy, with other actions.
        """
        replaced = []
        for tenant, entry in self.entries.items():
            stamp = _stamp(entry.path)
            if stamp == entry.stamp:
                entry.changing = None
                continue
            if stamp != entry.changing:
                entry.changing = stamp
                continue
            entry.stamp, entry.changing = stamp, None
            try:
                policy = load_policy(entry.path)
            except FileInvalid as error:
                entry.error = str(error)
                self.reload_errors += 1
                log.error("policy edit rejected, tenant %s keeps version %s:\n%s", tenant, entry.policy.version, error)
                continue
            entry.error = None
            if policy.version != entry.policy.version:
                entry.policy = policy
                replaced.append(tenant)
                log.info("tenant %s now uses policy %s version %s", tenant, policy.id, policy.version)
        return replaced
