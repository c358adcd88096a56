"""`rsafe-proxy train`: labelled JSONL + a policy -> a LoRA adapter for the guard model.

Stages: evaluate the untrained model (score mode) on held-out rows and on extra sets, a supervised warm-up
on labels, GRPO with RSafe's reward, evaluate again, write the adapter and a summary (`OUT/summary.json`).
Checkpoints every N steps; `--resume` continues from the newest one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsafe_proxy.datasets import Row, read_rows
from rsafe_proxy.evaluation import Metrics, compute_metrics, format_table, roc_auc
from rsafe_proxy.train.data import PromptBuilder, assign_templates, balance, sample, split_rows, trainable_family


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the train command."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE.jsonl",
        help="labelled rows to train on (repeatable); a share is held out",
    )
    data.add_argument(
        "--eval-data",
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help="extra evaluation sets, never trained on (repeatable)",
    )
    data.add_argument(
        "--policy", help="policy YAML whose categories the prompts show (default: the packaged RSafe policy)"
    )
    data.add_argument(
        "--template",
        action="append",
        metavar="FAMILY",
        help="prompt template family, repeatable: each row gets one of them by a hash of its id, and every "
        "evaluation set is scored with each (default: rsafe-compact)",
    )
    data.add_argument(
        "--held-out",
        type=float,
        default=0.15,
        metavar="FRACTION",
        help="share of each --data file held out for evaluation, by a hash of the row id (default: %(default)s)",
    )
    data.add_argument("--max-examples", type=int, metavar="N", help="train on at most N rows (classes balanced)")
    data.add_argument(
        "--eval-max",
        type=int,
        default=300,
        metavar="N",
        help="rows per evaluation set, 0 to skip evaluation (default: %(default)s)",
    )
    data.add_argument(
        "--max-length",
        type=int,
        default=384,
        metavar="TOKENS",
        help="prompt + answer tokens; long content is shortened (default: %(default)s)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (the packaged Gemma 3 270M) or a local model folder (default: %(default)s)",
    )
    model.add_argument(
        "--out", required=True, metavar="DIR", help="output folder: adapter/, checkpoints/, log.jsonl, summary.json"
    )
    model.add_argument(
        "--lora-r", type=int, default=8, help="LoRA rank; alpha is twice the rank (default: %(default)s)"
    )
    model.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated module names (default: attention and MLP projections)",
    )
    model.add_argument(
        "--dtype", choices=("auto", "bfloat16", "float32"), default="auto", help="weights dtype (default: bfloat16)"
    )
    model.add_argument(
        "--adapter-dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the saved adapter weights (default: %(default)s)",
    )

    sft = parser.add_argument_group("supervised warm-up")
    sft.add_argument(
        "--sft-epochs", type=int, default=1, help="epochs over the training rows, 0 to skip (default: %(default)s)"
    )
    sft.add_argument("--batch-size", type=int, default=8, help="rows per SFT step (default: %(default)s)")
    sft.add_argument("--lr", type=float, default=2e-4, help="SFT peak learning rate (default: %(default)s)")

    grpo = parser.add_argument_group("GRPO")
    grpo.add_argument("--grpo-steps", type=int, default=0, help="GRPO steps, 0 to skip (default: %(default)s)")
    grpo.add_argument("--rollouts", type=int, default=4, help="samples per prompt (default: %(default)s)")
    grpo.add_argument("--grpo-prompts", type=int, default=4, help="prompts per GRPO step (default: %(default)s)")
    grpo.add_argument("--grpo-lr", type=float, default=2e-5, help="GRPO learning rate (default: %(default)s)")
    grpo.add_argument(
        "--grpo-beta", type=float, default=0.0, help="KL penalty against the base model (default: %(default)s)"
    )
    grpo.add_argument(
        "--temperature", type=float, default=1.0, help="rollout sampling temperature (default: %(default)s)"
    )
    grpo.add_argument("--max-new-tokens", type=int, default=24, help="rollout length cap (default: %(default)s)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    run.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: %(default)s)")
    run.add_argument(
        "--eval-batch-size", type=int, default=8, help="rows per scoring forward pass (default: %(default)s)"
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        metavar="STEPS",
        help="checkpoint period in optimizer steps (default: %(default)s)",
    )
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    run.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="checkpoint and stop after this many optimizer steps (resume later)",
    )
    run.add_argument(
        "--time-limit", type=float, metavar="SECONDS", help="checkpoint and stop once training has run this long"
    )
    run.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_train(args: argparse.Namespace) -> int:
    """Run the train command; returns the process exit status."""
    import torch

    from rsafe_proxy.policy.loading import load_policy, packaged_policy_path
    from rsafe_proxy.train import modeling
    from rsafe_proxy.train.checkpoint import RunState, StepLog, list_checkpoints, load_checkpoint, save_checkpoint
    from rsafe_proxy.train.grpo import GrpoSettings, run_grpo
    from rsafe_proxy.train.sft import SftSettings, run_sft

    started = time.monotonic()
    templates: list[str] = list(dict.fromkeys(args.template or ["rsafe-compact"]))
    for name in templates:
        trainable_family(name)  # raises ValueError naming the families training supports
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = load_policy(args.policy or packaged_policy_path())
    builders = {name: PromptBuilder.for_policy(name, policy) for name in templates}

    rows = [row for path in args.data for row in read_rows(path)]
    train_pool, held_out = split_rows(rows, args.held_out)
    train_rows = assign_templates(balance(train_pool, args.seed, args.max_examples), templates)
    if not train_rows:
        print("error: no training rows", file=sys.stderr)
        return 2
    sources: dict[str, list[Row]] = {}
    if args.eval_max:
        if held_out:
            sources["held-out"] = sample(held_out, args.eval_max, args.seed)
        for path in args.eval_data:
            sources[Path(path).stem] = sample(read_rows(path), args.eval_max, args.seed)
    eval_sets: dict[str, list[Row]] = {}
    for name, source in sources.items():
        for template in templates:
            key = name if len(templates) == 1 else f"{name} [{template}]"
            eval_sets[key] = assign_templates(source, [template])

    model_path = modeling.resolve_model_path(args.model)
    tokenizer = modeling.load_tokenizer(model_path)
    base = modeling.load_model(model_path, modeling.torch_dtype(args.dtype), args.device)
    model = modeling.add_lora(base, args.lora_r, args.lora_targets.split(","))
    encoder = modeling.Encoder(tokenizer, builders, args.max_length)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    log = StepLog(out / "log.jsonl")

    state = RunState()
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    checkpoints = list_checkpoints(out) if args.resume else []
    if checkpoints:
        state, optimizer_state = load_checkpoint(checkpoints[-1], model, args.device)
        optimizer.load_state_dict(optimizer_state)
        print(f"resumed from {checkpoints[-1]} ({state.phase}, step {state.step})", file=sys.stderr)
        if state.phase == "done" and args.grpo_steps > state.grpo_steps:
            state.phase = "grpo"  # a finished run asked for more GRPO steps continues them
    elapsed_before = state.elapsed_s

    def progress(total: int, description: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, disable=args.no_progress, dynamic_ncols=True)

    def evaluate(label: str) -> dict[str, dict[str, Any]]:
        cached = out / f"eval-{label}.json"
        if cached.is_file():
            return dict(json.loads(cached.read_text(encoding="utf-8")))
        results: dict[str, dict[str, Any]] = {}
        with open(out / f"predictions-{label}.jsonl", "w", encoding="utf-8") as predictions:
            for name, eval_rows in eval_sets.items():
                bar = progress(len(eval_rows), f"eval {label} {name}")
                begun = time.monotonic()
                probabilities = modeling.unsafe_probabilities(
                    model, encoder, eval_rows, args.eval_batch_size, args.device, bar
                )
                bar.close()
                seconds = time.monotonic() - begun
                predicted = ["unsafe" if p >= 0.5 else "safe" for p in probabilities]
                metrics = compute_metrics([row.label for row in eval_rows], predicted)
                results[name] = {
                    **metrics.as_dict(),
                    "auroc": roc_auc([row.label for row in eval_rows], probabilities),
                    "seconds": round(seconds, 1),
                }
                for row, probability in zip(eval_rows, probabilities, strict=True):
                    predictions.write(
                        json.dumps({"set": name, "id": row.id, "label": row.label, "p_unsafe": round(probability, 5)})
                        + "\n"
                    )
        cached.write_text(json.dumps(results, indent=2), encoding="utf-8")
        return results

    def checkpoint() -> None:
        state.elapsed_s = elapsed_before + time.monotonic() - started
        save_checkpoint(out, model, optimizer, state)

    steps_at_start = state.step

    def on_step(record: dict[str, Any]) -> None:
        log.write(record)
        if args.stop_after is not None and state.step - steps_at_start >= args.stop_after:
            raise _Stop(f"stopped after {args.stop_after} steps")
        if args.time_limit is not None and time.monotonic() - started >= args.time_limit:
            raise _Stop(f"stopped at the time limit of {args.time_limit:.0f} s")

    if state.phase == "sft" and state.step == 0:
        with model.disable_adapter():
            before = evaluate("before")
    else:
        before = evaluate("before") if (out / "eval-before.json").is_file() else {}

    encoded = [encoder.encode(row) for row in train_rows]
    print(
        f"train rows {len(train_rows)} (unsafe {sum(row.label == 'unsafe' for row in train_rows)}), "
        f"mean tokens {sum(len(e.prompt_ids) + len(e.target_ids) for e in encoded) / len(encoded):.0f}, "
        f"held-out {len(held_out)}, eval sets {', '.join(f'{k}={len(v)}' for k, v in eval_sets.items()) or 'none'}",
        file=sys.stderr,
    )
    sft_settings = SftSettings(args.sft_epochs, args.batch_size, args.lr, args.checkpoint_every, args.seed)
    bars: list[Any] = []
    try:
        if state.phase == "sft":
            if args.sft_epochs:
                per_epoch = -(-len(encoded) // args.batch_size)
                bars.append(progress(per_epoch * args.sft_epochs, "sft"))
                bars[-1].update(state.sft_steps)
                pad_id = tokenizer.pad_token_id
                run_sft(
                    model, optimizer, encoded, sft_settings, state, pad_id, args.device, on_step, checkpoint, bars[-1]
                )
            state.phase = "grpo"
            optimizer = torch.optim.AdamW(trainable, lr=args.grpo_lr, weight_decay=0.0)
            checkpoint()
        if state.phase == "grpo":
            if args.grpo_steps:
                settings = GrpoSettings(
                    steps=args.grpo_steps,
                    prompts_per_step=args.grpo_prompts,
                    rollouts=args.rollouts,
                    lr=args.grpo_lr,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    beta=args.grpo_beta,
                    checkpoint_every=args.checkpoint_every,
                    seed=args.seed,
                )
                bars.append(progress(args.grpo_steps, "grpo"))
                bars[-1].update(state.grpo_steps)
                run_grpo(
                    model, optimizer, encoder, train_rows, settings, state, args.device, on_step, checkpoint, bars[-1]
                )
            state.phase = "done"
            checkpoint()
    except _Stop as stop:
        checkpoint()
        print(f"{stop} at {state.phase} step {state.step}; run again with --resume to continue", file=sys.stderr)
        return 0
    finally:
        for bar in bars:
            bar.close()

    after = evaluate("after")
    adapter_dir = save_adapter(model, out / "adapter", args.adapter_dtype, args.model)
    summary = {
        "model": args.model,
        "template": ",".join(templates),
        "policy": policy.id,
        "data": [str(path) for path in args.data],
        "eval_data": [str(path) for path in args.eval_data],
        "train_rows": len(train_rows),
        "held_out_rows": len(held_out),
        "max_length": args.max_length,
        "lora_r": args.lora_r,
        "sft_epochs": args.sft_epochs,
        "sft_steps": state.sft_steps,
        "grpo_steps": state.grpo_steps,
        "rollouts": args.rollouts,
        "tokens_trained": state.tokens,
        "device": args.device,
        "seconds": round(elapsed_before + time.monotonic() - started, 1),
        "sft_loss_last": _tail_mean(state.history.get("sft_loss", [])),
        "grpo_reward_first": _head_mean(state.history.get("grpo_reward", [])),
        "grpo_reward_last": _tail_mean(state.history.get("grpo_reward", [])),
        "before": before,
        "after": after,
        "adapter": str(adapter_dir),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(summary_text(summary))
    return 0


class _Stop(Exception):
    """Raised from a step callback to end this invocation at a checkpoint (--stop-after, --time-limit)."""


def _head_mean(values: Sequence[float], count: int = 10) -> float | None:
    return round(sum(values[:count]) / len(values[:count]), 4) if values else None


def _tail_mean(values: Sequence[float], count: int = 10) -> float | None:
    return round(sum(values[-count:]) / len(values[-count:]), 4) if values else None


def save_adapter(model: Any, folder: Path, dtype_name: str, base_name: str) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT's layout) into `folder`.

    The config names the base model as given on the command line (`embedded`), not a local cache path.
    """
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    folder.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_name
    config.save_pretrained(str(folder))
    weights = {
        name: tensor.detach().to("cpu", dtype).contiguous()
        for name, tensor in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


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
    lines.append(f"adapter: {summary['adapter']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rsafe_proxy.train`: the train command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="rsafe-proxy train", description=__doc__)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))
