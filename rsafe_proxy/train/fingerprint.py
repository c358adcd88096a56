"""Digests of what produced a result (a model's files, labelled rows, options), so that a stored result is reused
only when everything it was computed from is the same: a folder's path says nothing of what is in it now (a
model or an adapter retrained in place keeps its path), so it is read, not named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rsafe_proxy.datasets import Row

_CHUNK = 1 << 20
# A verdict head lying beside a model (head.safetensors, head.json, head-report.json) changes none of the model's
# hidden states or scores: a head trained and copied in does not make its features stale.
_NOT_THE_MODEL = ("head.", "head-")


def file_digest(path: Path) -> str:
    """SHA-256 of one file's bytes, read in chunks (weights can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(folder: Path) -> str:
    """SHA-256 over the name and bytes of every file in a model or adapter folder (top level, as Hugging Face
    folders are laid out), the verdict head's files left out."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(_NOT_THE_MODEL):
            digest.update(f"{path.name}\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


def rows_digest(rows: Iterable[Row]) -> str:
    """SHA-256 of labelled rows as they are used: id, label, side, prompt, response and template."""
    digest = hashlib.sha256()
    for row in rows:
        fields = [row.id, row.label, row.side.value, row.prompt, row.response, row.template]
        digest.update(json.dumps(fields, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def value_digest(value: Any) -> str:
    """SHA-256 of a JSON-able value (paths and tuples as JSON strings and lists), keys in sorted order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
