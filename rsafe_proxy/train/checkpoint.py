"""Run state, checkpoints and the step log of a training run (`OUT/checkpoints/`, `OUT/log.jsonl`).

A checkpoint holds the LoRA weights, the optimizer state and the position in the run (phase, epoch, batch,
step), so `--resume` continues from the exact batch after it. Only the newest few are kept.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

KEEP = 2


@dataclass
class RunState:
    """Where a run stands. `phase` is sft, grpo or done; counters are of optimizer steps and batches."""

    phase: str = "sft"
    epoch: int = 0
    batch_index: int = 0
    sft_steps: int = 0
    grpo_steps: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    history: dict[str, list[float]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        """Optimizer steps taken in all phases."""
        return self.sft_steps + self.grpo_steps

    def remember(self, key: str, value: float) -> None:
        """Append a logged value (loss, reward) to the history kept for the summary."""
        self.history.setdefault(key, []).append(value)


class StepLog:
    """Appends one JSON object per line to `log.jsonl`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        """Log `record` with a timestamp."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def checkpoint_dir(out: Path) -> Path:
    """The folder that holds the run's checkpoints."""
    return out / "checkpoints"


def save_checkpoint(out: Path, model: Any, optimizer: torch.optim.Optimizer, state: RunState) -> Path:
    """Write a checkpoint for `state` (atomically: a complete folder or none) and prune old ones."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{state.phase}-{state.step:06d}"
    staging = root / f".{target.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    weights = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }
    save_file(weights, str(staging / "adapter.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    for old in list_checkpoints(out)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of the run, oldest first."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if (path / "state.json").is_file() and not path.name.startswith(".")]
    return sorted(found, key=lambda path: (json.loads((path / "state.json").read_text())["elapsed_s"], path.name))


def load_checkpoint(path: Path, model: Any, device: str) -> tuple[RunState, dict[str, Any]]:
    """Load the LoRA weights of checkpoint `path` into `model`; return its state and the optimizer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter.safetensors"), device=device))
    state = RunState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    optimizer_state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    return state, optimizer_state
