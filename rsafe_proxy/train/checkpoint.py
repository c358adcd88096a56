"""Where a run keeps its files in `OUT/`, and what a resumed run reads back.

- `checkpoints/sft/checkpoint-N`, `checkpoints/grpo/checkpoint-N`: the trainers' own checkpoints (weights or
  LoRA weights, optimizer, scheduler, RNG states, trainer state); the newest `KEEP` of each phase are kept.
- `stages/sft/`: the warm-up's result, written when it ends; GRPO starts from it.
- `log.jsonl`: one line per optimizer step (and per evaluation); `run.json`: seconds spent over all invocations;
  `inputs.json`: a digest per phase of what it is computed from (command.keep_inputs), so that a resumed run
  continues only a run of the same rows, model and options.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

KEEP = 2
PHASES = ("sft", "grpo")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class StepLog:
    """Appends one JSON object per line to `log.jsonl`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        """Log `record` with a timestamp."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every record logged so far, oldest first."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def checkpoint_dir(out: Path, phase: str) -> Path:
    """The folder of a phase's trainer checkpoints."""
    return out / "checkpoints" / phase


def stage_dir(out: Path, phase: str) -> Path:
    """The folder of a finished phase's model (an adapter, or a whole model with --finetune full)."""
    return out / "stages" / phase


def list_checkpoints(out: Path, phase: str) -> list[Path]:
    """The complete checkpoints of a phase, oldest first (a trainer writes `trainer_state.json` last)."""
    root = checkpoint_dir(out, phase)
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and (path / "trainer_state.json").is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(out: Path, phase: str) -> Path | None:
    """The newest complete checkpoint of a phase, if any."""
    found = list_checkpoints(out, phase)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at."""
    return int(json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


def has_run(out: Path) -> bool:
    """True when `out` already holds (part of) a run: a checkpoint, a stage or a step log."""
    return (out / "log.jsonl").is_file() or (out / "checkpoints").is_dir() or (out / "stages").is_dir()


def seconds_so_far(out: Path) -> float:
    """Training seconds of earlier invocations of this run."""
    path = out / "run.json"
    return float(json.loads(path.read_text(encoding="utf-8"))["seconds"]) if path.is_file() else 0.0


def record_seconds(out: Path, seconds: float) -> None:
    """Remember the run's seconds over all invocations so far."""
    (out / "run.json").write_text(json.dumps({"seconds": round(seconds, 3)}), encoding="utf-8")
