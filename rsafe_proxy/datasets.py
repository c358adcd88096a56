"""Labelled rows in the normalized dataset format ({id, prompt, response, label, task}), shared by
`rsafe-proxy eval` and `rsafe-proxy train`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rsafe_proxy.guard.protocol import Side

LABELS = ("safe", "unsafe")


@dataclass(frozen=True)
class Row:
    """One labelled example: screen `prompt` (task "prompt") or the `response` to it (task "response")."""

    id: str
    prompt: str
    response: str | None
    label: str
    task: str
    origin: str = ""
    template: str = ""  # the template family to render with; "" is the run's first one

    @property
    def side(self) -> Side:
        """The side the guard screens for this row."""
        return Side.OUTPUT if self.task == "response" else Side.INPUT


def read_rows(path: str | Path) -> list[Row]:
    """The rows of one normalized JSONL file; rows without a safe/unsafe label are an error."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(record, dict) or "id" not in record or "prompt" not in record:
                raise ValueError(f"{path}:{number}: a row is a JSON object with at least 'id', 'prompt' and 'label'")
            label = str(record.get("label", "")).strip().lower()
            if label not in LABELS:
                raise ValueError(f"{path}:{number}: label must be safe or unsafe, not {record.get('label')!r}")
            task = record.get("task") or ("response" if record.get("response") else "prompt")
            if task not in ("prompt", "response"):
                raise ValueError(f"{path}:{number}: task must be prompt or response, not {task!r}")
            rows.append(
                Row(
                    id=str(record["id"]),
                    prompt=str(record["prompt"]),
                    response=record.get("response"),
                    label=label,
                    task=task,
                    origin=path.stem,
                )
            )
    return rows
