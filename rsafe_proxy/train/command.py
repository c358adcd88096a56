"""`rsafe-proxy train`: labelled JSONL + a policy -> a guard model (a LoRA adapter, or a whole model), on TRL.

Phases, each a function below: prepare (rows, split, templates, tokenizer), evaluate the base model (score
mode) on held-out rows and extra sets, a supervised warm-up on labels (SFTTrainer), GRPO with RSafe's reward
(GRPOTrainer), export (adapter/model, optionally merged), evaluate the exported model, write the summary
(`OUT/summary.json`). Checkpoints every N steps; `--resume` continues from the newest one. Run it under
`accelerate launch` for several GPUs or machines (adapters/train/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsafe_proxy.datasets import Row, read_rows
from rsafe_proxy.evaluation import Metrics, format_table
from rsafe_proxy.train.data import PromptBuilder, assign_templates, balance, sample, split_rows
from rsafe_proxy.train.fingerprint import folder_digest, rows_digest, value_digest
from rsafe_proxy.train.options import TrainOptions, add_train_arguments

if TYPE_CHECKING:
    from rsafe_proxy.train.callbacks import StopCallback

__all__ = ["add_train_arguments", "main", "run_train", "summary_text", "train"]


@dataclass(frozen=True)
class Prepared:
    """What the phases share: the options, the rows, the evaluation sets and the model's tokenizer."""

    options: TrainOptions
    policy_id: str
    train_rows: list[Row]
    held_out: list[Row]
    eval_sets: dict[str, list[Row]]
    model_path: Path
    model_digest: str  # of the base model's files (fingerprint.folder_digest), read once: weights can be gigabytes
    tokenizer: Any
    encoder: Any
    state: Any  # accelerate's PartialState: which process this is, of how many, on which device

    @property
    def out(self) -> Path:
        """The run's output folder."""
        return self.options.out

    @property
    def main(self) -> bool:
        """True on the process that writes files and evaluates (the only one without accelerate)."""
        return bool(self.state.is_main_process)

    @property
    def device(self) -> str:
        """This process's device, for evaluation."""
        return str(self.state.device)


class NothingToTrain(ValueError):
    """The options leave no step to take, or no row to take it on."""


def run_train(args: argparse.Namespace) -> int:
    """Run the train command from parsed arguments; returns the process exit status."""
    options = TrainOptions.from_namespace(args)  # raises ValueError on bad options, before anything runs
    try:
        return train(options)
    except NothingToTrain as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def train(options: TrainOptions) -> int:
    """The whole run; returns the process exit status (0 also when a stop rule ended it at a checkpoint)."""
    from rsafe_proxy.train.callbacks import StopCallback
    from rsafe_proxy.train.checkpoint import record_seconds, seconds_so_far
    from rsafe_proxy.train.trainers import free_memory

    started = time.monotonic()
    run = prepare(options)
    before = evaluate_base(run)
    stopper = StopCallback(started, options.stop_after, options.time_limit)
    finished = warm_up(run, stopper) and reinforce(run, stopper)
    free_memory()
    earlier = seconds_so_far(run.out)
    if run.main:
        record_seconds(run.out, earlier + time.monotonic() - started)
    if not finished:
        if run.main:
            print(f"{stopper.reason}; run again with --resume to continue", file=sys.stderr)
        return 0
    if not run.main:
        return 0
    outputs = export(run)
    after = evaluate_output(run, outputs)
    summary = summarize(run, before, after, outputs, earlier + time.monotonic() - started)
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(summary_text(summary))
    return 0


def prepare(options: TrainOptions) -> Prepared:
    """Read and split the rows, assign templates, load the tokenizer; refuse an `--out` with another run in it
    unless resuming."""
    import torch
    from accelerate import PartialState

    from rsafe_proxy.policy.loading import load_policy, packaged_policy_path
    from rsafe_proxy.train import modeling
    from rsafe_proxy.train.checkpoint import has_run

    if options.sft_epochs == 0 and options.grpo_steps == 0:
        raise NothingToTrain("--sft-epochs and --grpo-steps are both 0: nothing to train")
    if not options.resume and has_run(options.out):
        raise NothingToTrain(f"{options.out} already holds a run: add --resume to continue it, or pick another --out")
    torch.set_num_threads(max(1, options.threads))
    torch.manual_seed(options.seed)
    state = PartialState(cpu=options.device == "cpu")
    policy = load_policy(options.policy or packaged_policy_path())
    builders = {name: PromptBuilder.for_policy(name, policy) for name in options.templates}

    rows = [row for path in options.data for row in read_rows(path)]
    train_pool, held_out = split_rows(rows, options.held_out)
    train_rows = assign_templates(balance(train_pool, options.seed, options.max_examples), options.templates)
    if not train_rows:
        raise NothingToTrain("no training rows")
    sources: dict[str, list[Row]] = {}
    if options.eval_max:
        if held_out:
            sources["held-out"] = sample(held_out, options.eval_max, options.seed)
        for path in options.eval_data:
            sources[path.stem] = sample(read_rows(path), options.eval_max, options.seed)
    eval_sets: dict[str, list[Row]] = {}
    for name, source in sources.items():
        for template in options.templates:
            key = name if len(options.templates) == 1 else f"{name} [{template}]"
            eval_sets[key] = assign_templates(source, [template])

    model_path = modeling.resolve_model_path(options.model)
    tokenizer = modeling.load_tokenizer(model_path)
    encoder = modeling.Encoder(tokenizer, builders, options.max_length)
    digest = folder_digest(model_path)
    run = Prepared(options, policy.id, train_rows, held_out, eval_sets, model_path, digest, tokenizer, encoder, state)
    keep_inputs(run)
    state.wait_for_everyone()
    return run


# What each phase's result is computed from, besides the base model, the training rows and their prompts. Run
# controls (stop rules, threads, progress, evaluation, export) are not: a resumed run may change them. Nor is
# --grpo-steps: asking for more steps continues GRPO where it stopped.
_SFT_INPUTS = (
    "finetune",
    "lora_r",
    "lora_targets",
    "dtype",
    "max_length",
    "sft_epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "seed",
)
_GRPO_INPUTS = ("rollouts", "grpo_prompts", "grpo_lr", "grpo_beta", "grpo_loss", "temperature", "max_new_tokens")


def phase_keys(run: Prepared) -> dict[str, str]:
    """A digest per phase of what its checkpoints and result were computed from (GRPO's includes the warm-up's)."""
    options = run.options
    sft = value_digest(
        {
            "model": run.model_digest,
            "rows": rows_digest(run.train_rows),
            "prompts": repr(sorted(run.encoder.builders.items())),
            **{name: getattr(options, name) for name in _SFT_INPUTS},
        }
    )
    grpo = value_digest({"sft": sft, **{name: getattr(options, name) for name in _GRPO_INPUTS}})
    return {"sft": sft, "grpo": grpo}


def keep_inputs(run: Prepared) -> None:
    """Record the phases' keys in `OUT/inputs.json`. A resumed run is refused where a phase that has checkpoints or
    a result was computed from other inputs, so that neither is ever reused for other rows, model or options."""
    from rsafe_proxy.train.checkpoint import checkpoint_dir, stage_dir

    path, keys = run.out / "inputs.json", phase_keys(run)
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    stored = [phase for phase in keys if checkpoint_dir(run.out, phase).is_dir() or stage_dir(run.out, phase).is_dir()]
    unrecorded = [phase for phase in stored if phase not in recorded]
    if unrecorded:  # made before the inputs were recorded: what they came from cannot be told
        raise NothingToTrain(
            f"{run.out} holds {' and '.join(unrecorded)} results whose inputs are not recorded (no {path.name}: an "
            "older run): pick another --out, or delete the folder to train it afresh"
        )
    changed = [phase for phase in stored if recorded[phase] != keys[phase]]
    if changed:
        raise NothingToTrain(
            f"{run.out} holds a run of other inputs (its {' and '.join(changed)} phase: the rows, the model or an "
            "option changed): resume it with what it started with, or pick another --out"
        )
    run.state.wait_for_everyone()  # every process has read the record before it is replaced
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(keys, indent=2), encoding="utf-8")


def _evaluate(run: Prepared, label: str, model_path: Path, adapter: Path | None) -> dict[str, dict[str, Any]]:
    from rsafe_proxy.train import modeling, scoring

    if not run.main:
        return {}
    return scoring.evaluate(
        label,
        run.out,
        model_path,
        adapter,
        run.eval_sets,
        run.encoder,
        dtype=modeling.torch_dtype(run.options.dtype),
        device=run.device,
        model_digest=run.model_digest if model_path == run.model_path else folder_digest(model_path),
        batch_size=run.options.eval_batch_size,
        progress=run.options.progress,
    )


def evaluate_base(run: Prepared) -> dict[str, dict[str, Any]]:
    """Score mode on every evaluation set with the untrained model (the main process; others wait)."""
    results = _evaluate(run, "before", run.model_path, None)
    run.state.wait_for_everyone()
    return results


def warm_up(run: Prepared, stopper: StopCallback) -> bool:
    """The supervised warm-up, from its newest checkpoint when resuming; False when a stop rule ended it."""
    from rsafe_proxy.train import examples
    from rsafe_proxy.train.checkpoint import StepLog, latest_checkpoint, stage_dir
    from rsafe_proxy.train.trainers import run_phase, sft_trainer, trainable_model

    options, stage = run.options, stage_dir(run.out, "sft")
    # a finished warm-up is of these very inputs: keep_inputs refused a resumed run of any other
    if options.sft_epochs == 0 or (stage / "config.json").is_file() or (stage / "adapter_config.json").is_file():
        return True
    dataset = examples.sft_dataset(run.encoder, run.train_rows)
    if run.main:
        mean = examples.token_count(dataset) / len(dataset)
        print(
            f"train rows {len(run.train_rows)} (unsafe {sum(row.label == 'unsafe' for row in run.train_rows)}), "
            f"mean tokens {mean:.0f}, held-out {len(run.held_out)}, "
            f"eval sets {', '.join(f'{k}={len(v)}' for k, v in run.eval_sets.items()) or 'none'}",
            file=sys.stderr,
        )
    trainer = sft_trainer(
        options,
        lambda: trainable_model(options, run.model_path, None, run.encoder.stop_ids),
        run.tokenizer,
        dataset,
        run.out,
    )
    resume = latest_checkpoint(run.out, "sft") if options.resume else None
    run_phase(trainer, "sft", StepLog(run.out / "log.jsonl"), stopper, resume)
    if stopper.reason is not None:
        return False
    trainer.save_model(str(stage))
    run.state.wait_for_everyone()
    return True


def reinforce(run: Prepared, stopper: StopCallback) -> bool:
    """GRPO from the warm-up's result (or the base model), from its newest checkpoint when resuming; False when
    a stop rule ended it."""
    from rsafe_proxy.train import examples
    from rsafe_proxy.train.checkpoint import StepLog, latest_checkpoint, stage_dir
    from rsafe_proxy.train.trainers import grpo_trainer, run_phase, trainable_model

    options = run.options
    if options.grpo_steps == 0:
        return True
    if stopper.reason is not None:
        return False
    sft = stage_dir(run.out, "sft")
    start = sft if options.sft_epochs and sft.is_dir() else None
    dataset = examples.grpo_dataset(run.encoder, run.train_rows, options.max_new_tokens)
    trainer = grpo_trainer(
        options,
        lambda: trainable_model(options, run.model_path, start, run.encoder.stop_ids),
        run.tokenizer,
        dataset,
        run.out,
        run.state.num_processes,
        run.encoder.stop_ids,
    )
    resume = latest_checkpoint(run.out, "grpo") if options.resume else None
    run_phase(trainer, "grpo", StepLog(run.out / "log.jsonl"), stopper, resume)
    if stopper.reason is not None:
        return False
    trainer.save_model(str(stage_dir(run.out, "grpo")))
    run.state.wait_for_everyone()
    return True


@dataclass(frozen=True)
class Outputs:
    """What the run wrote for serving: an adapter (LoRA) or a model folder (full), and a merged model."""

    adapter: Path | None
    model: Path | None
    merged: Path | None


def export(run: Prepared) -> Outputs:
    """The last stage's result as the run's output: `OUT/adapter` (LoRA, PEFT's two files, the base named as
    given) or `OUT/model` (full, with tokenizer and end-of-turn stops); `OUT/merged` with --merge."""
    from rsafe_proxy.train import export as exporting
    from rsafe_proxy.train.checkpoint import stage_dir

    options = run.options
    last = stage_dir(run.out, "grpo" if options.grpo_steps else "sft")
    if options.finetune == "full":
        model = exporting.copy_output(last, run.out / "model")
        run.tokenizer.save_pretrained(str(model))
        exporting.write_generation_config(model, run.encoder.stop_ids)
        return Outputs(None, model, None)
    adapter = exporting.finish_adapter(
        exporting.copy_output(last, run.out / "adapter"), options.adapter_dtype, options.model
    )
    merged = None
    if options.merge:
        merged = exporting.merge(run.model_path, adapter, run.out / "merged", run.tokenizer, run.encoder.stop_ids)
    return Outputs(adapter, None, merged)


def evaluate_output(run: Prepared, outputs: Outputs) -> dict[str, dict[str, Any]]:
    """Score mode with what was written, loaded as the transformers engine loads it."""
    if outputs.model is not None:
        return _evaluate(run, "after", outputs.model, None)
    return _evaluate(run, "after", run.model_path, outputs.adapter)


def summarize(
    run: Prepared,
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    outputs: Outputs,
    seconds: float,
) -> dict[str, Any]:
    """The run's summary: its size, the step log's losses and rewards, and the metrics before and after."""
    from rsafe_proxy.train.checkpoint import StepLog

    options = run.options
    records = StepLog(run.out / "log.jsonl").records()
    sft = [record for record in records if record["phase"] == "sft" and "loss" in record]
    grpo = [record for record in records if record["phase"] == "grpo" and "reward" in record]
    tokens = sum(int(steps[-1].get("num_tokens", 0)) for steps in (sft, grpo) if steps)
    return {
        "model": options.model,
        "trainer": "trl",
        "finetune": options.finetune,
        "template": ",".join(options.templates),
        "policy": run.policy_id,
        "data": [str(path) for path in options.data],
        "eval_data": [str(path) for path in options.eval_data],
        "train_rows": len(run.train_rows),
        "held_out_rows": len(run.held_out),
        "max_length": options.max_length,
        "lora_r": options.lora_r if options.finetune == "lora" else None,
        "sft_epochs": options.sft_epochs,
        "sft_steps": sft[-1]["step"] if sft else 0,
        "grpo_steps": grpo[-1]["step"] if grpo else 0,
        "rollouts": options.rollouts,
        "processes": int(run.state.num_processes),
        "tokens_trained": tokens,
        "device": options.device,
        "seconds": round(seconds, 1),
        "sft_loss_last": _tail_mean([record["loss"] for record in sft]),
        "grpo_reward_first": _head_mean([record["reward"] for record in grpo]),
        "grpo_reward_last": _tail_mean([record["reward"] for record in grpo]),
        "before": before,
        "after": after,
        "adapter": str(outputs.adapter) if outputs.adapter else None,
        "model_dir": str(outputs.model) if outputs.model else None,
        "merged": str(outputs.merged) if outputs.merged else None,
    }


def _head_mean(values: Sequence[float], count: int = 10) -> float | None:
    return round(sum(values[:count]) / len(values[:count]), 4) if values else None


def _tail_mean(values: Sequence[float], count: int = 10) -> float | None:
    return round(sum(values[-count:]) / len(values[-count:]), 4) if values else None


def summary_text(summary: dict[str, Any]) -> str:
    """The printed end-of-run summary: the run's size and a before/after metrics table."""
    lines = [
        f"trained {summary['model']} ({summary['template']} template, policy {summary['policy']}) on "
        f"{summary['train_rows']} rows: {summary['sft_steps']} SFT steps, {summary['grpo_steps']} GRPO steps, "
        f"{summary['tokens_trained']} tokens, {summary['seconds']:.0f} s on {summary['device']}",
    ]
    if summary["sft_loss_last"] is not None:
        lines.append(f"SFT loss (mean of last 10 steps): {summary['sft_loss_last']}")
    if summary["grpo_reward_first"] is not None:
        lines.append(
            f"GRPO reward: first 10 steps {summary['grpo_reward_first']}, last 10 steps {summary['grpo_reward_last']}"
        )
    table: list[tuple[str, Metrics]] = []
    for stage in ("before", "after"):
        for name, values in summary[stage].items():
            fields = {key: value for key, value in values.items() if key in Metrics.__dataclass_fields__}
            table.append((f"{name} ({stage})", Metrics(**fields)))
    if table:
        lines.append(format_table(table))
    for key in ("adapter", "model_dir", "merged"):
        if summary[key]:
            lines.append(f"{key.replace('_dir', '')}: {summary[key]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rsafe_proxy.train`: the train command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="rsafe-proxy train", description=__doc__)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))
