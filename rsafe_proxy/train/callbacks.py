"""Trainer callbacks: the step log, the stop rules (--stop-after, --time-limit), quiet progress bars."""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from rsafe_proxy.train.checkpoint import StepLog

# TRL's names for what the step log calls reward, accuracy and format (reward.REWARD_FUNCTIONS' names)
RENAMED = {"rewards/accuracy_score/mean": "accuracy", "rewards/format_score/mean": "format", "learning_rate": "lr"}


class StepLogCallback(TrainerCallback):
    """Writes each optimizer step's logged values to `log.jsonl` as {phase, step, loss, lr, ...} (main process)."""

    def __init__(self, log: StepLog, phase: str) -> None:
        self.log = log
        self.phase = phase

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        """Log the step's numbers; the trainer's end-of-training summary (train_runtime, ...) is not a step."""
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return
        record: dict[str, Any] = {"phase": self.phase, "step": int(state.global_step)}
        for key, value in logs.items():
            if isinstance(value, int | float) and math.isfinite(value):
                record[RENAMED.get(key, key)] = round(float(value), 6)
        self.log.write(record)


class StopCallback(TrainerCallback):
    """Checkpoints and ends training after `stop_after` steps of this invocation or at `time_limit` seconds from
    `started` (time.monotonic()); one instance is shared by the phases, so the count spans them."""

    def __init__(self, started: float, stop_after: int | None, time_limit: float | None) -> None:
        self.started = started
        self.stop_after = stop_after
        self.time_limit = time_limit
        self.steps = 0
        self.reason: str | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> Any:
        """Count the step; past a limit, ask the trainer to save a checkpoint and stop."""
        self.steps += 1
        if self.stop_after is not None and self.steps >= self.stop_after:
            self.reason = f"stopped after {self.stop_after} steps"
        elif self.time_limit is not None and time.monotonic() - self.started >= self.time_limit:
            self.reason = f"stopped at the time limit of {self.time_limit:.0f} s"
        if self.reason is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class QuietProgressCallback(ProgressCallback):
    """The trainers' progress bar without the dict of numbers it prints at every log (the step log has them)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """Nothing: the bar itself shows the progress."""
