"""One rule for every file the proxy watches (policy files, proxy.yaml): a changed file is read once it has settled.

A file is settled when it is unchanged for one poll after a change was seen: an editor writing it in place could
otherwise be caught half-way, and the first lines of a policy (or of proxy.yaml) may well be a valid file, with
other actions or fewer tenants.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

Stamp = tuple[int, int, int]
MISSING: Stamp = (-1, -1, -1)


def stamp(path: Path) -> Stamp:
    """What tells one version of a file from another: inode, mtime and size (MISSING when it cannot be read)."""
    try:
        stat = os.stat(path)
    except OSError:
        return MISSING
    # the inode too: an editor that saves by renaming a new file over the old one may keep mtime and size
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


class FileWatch:
    """Which of the watched files changed since they were last read and have settled since: read those now.

    Polled from one task (the runtime's watcher): its state is that task's, never shared between requests.
    """

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        self._read: dict[Path, Stamp] = {}  # the version of each file now in force
        self._changing: dict[Path, Stamp] = {}  # seen changed by the latest poll: read once it stays so
        self.follow(paths)

    def follow(self, paths: Iterable[Path]) -> None:
        """Watch exactly `paths` from now on. A path new to the watch is taken as read in its present state (its
        caller has just read it); a path already watched keeps its state; the others are dropped."""
        wanted = {Path(path) for path in paths}
        self._read = {path: self._read[path] if path in self._read else stamp(path) for path in wanted}
        self._changing = {path: seen for path, seen in self._changing.items() if path in wanted}

    def settled(self) -> list[Path]:
        """The files to read now: changed since they were read, and unchanged since the previous call. Each is
        taken as read from now on (a file that cannot be used is not reported again until it changes)."""
        ready = []
        for path, read in self._read.items():
            current = stamp(path)
            if current == read:
                self._changing.pop(path, None)
            elif self._changing.get(path) != current:
                self._changing[path] = current
            else:
                self._read[path] = current
                del self._changing[path]
                ready.append(path)
        return ready
