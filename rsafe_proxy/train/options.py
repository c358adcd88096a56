"""The train command's options: argparse declares them, `TrainOptions.from_namespace` reads them once, checked.

Everything after parsing takes a `TrainOptions` (frozen), never the `argparse.Namespace`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from rsafe_proxy.train.data import trainable_family

Finetune = Literal["lora", "full"]
Rollouts = Literal["auto", "transformers", "vllm-colocate", "vllm-server"]
GrpoLoss = Literal["grpo", "dapo", "dr_grpo", "bnpo"]


@dataclass(frozen=True)
class TrainOptions:
    """One training run, as asked for on the command line (see `add_train_arguments` for each field's meaning)."""

    data: tuple[Path, ...]
    out: Path
    eval_data: tuple[Path, ...] = ()
    policy: Path | None = None
    templates: tuple[str, ...] = ("rsafe-compact",)
    held_out: float = 0.15
    max_examples: int | None = None
    eval_max: int = 300
    max_length: int = 384
    model: str = "embedded"
    finetune: Finetune = "lora"
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    adapter_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    merge: bool = False
    gradient_checkpointing: bool = False
    sft_epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    grpo_steps: int = 0
    rollouts: int = 4
    grpo_prompts: int = 4
    grpo_lr: float = 2e-5
    grpo_beta: float = 0.0
    grpo_loss: GrpoLoss = "dapo"
    temperature: float = 1.0
    max_new_tokens: int = 24
    rollout_engine: Rollouts = "auto"
    vllm_server_url: str | None = None
    vllm_gpu_memory: float = 0.3
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    threads: int = 2
    eval_batch_size: int = 8
    checkpoint_every: int = 50
    resume: bool = False
    stop_after: int | None = None
    time_limit: float | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in self.templates:
            trainable_family(name)  # raises ValueError naming the families training supports
        problems = []
        if not 0.0 <= self.held_out < 1.0:
            problems.append(f"--held-out must be in [0, 1), not {self.held_out}")
        for name in ("batch_size", "grad_accum", "rollouts", "grpo_prompts", "max_length", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("sft_epochs", "grpo_steps", "eval_max", "checkpoint_every"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative")
        if self.finetune == "lora" and self.lora_r < 1:
            problems.append("--lora-r must be at least 1 (or use --finetune full)")
        if self.rollouts < 2 and self.grpo_steps:
            problems.append("--rollouts must be at least 2: GRPO compares the answers to one prompt")
        if self.rollout_engine == "vllm-server" and not self.vllm_server_url:
            problems.append("--rollout-engine vllm-server needs --vllm-server-url (a `trl vllm-serve` server)")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> TrainOptions:
        """The options of a parsed command line (unknown attributes, such as the CLI's own, are ignored)."""
        values = vars(args)
        known = {field.name for field in fields(cls)}
        given = {name: value for name, value in values.items() if name in known and value is not None}
        given["data"] = tuple(Path(path) for path in values["data"])
        given["out"] = Path(values["out"])
        given["eval_data"] = tuple(Path(path) for path in values.get("eval_data") or ())
        if values.get("policy"):
            given["policy"] = Path(values["policy"])
        given["templates"] = tuple(dict.fromkeys(values.get("template") or ["rsafe-compact"]))
        given["lora_targets"] = tuple(name for name in str(values["lora_targets"]).split(",") if name)
        given["progress"] = not values.get("no_progress", False)
        return cls(**given)

    @property
    def completions_per_step(self) -> int:
        """GRPO completions per optimizer step (prompts x rollouts), over all processes."""
        return self.grpo_prompts * self.rollouts


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
        "--out",
        required=True,
        metavar="DIR",
        help="output folder: adapter/ (or model/), checkpoints/, log.jsonl, summary.json",
    )
    model.add_argument(
        "--finetune",
        choices=("lora", "full"),
        default="lora",
        help="train LoRA adapters (written to OUT/adapter) or every weight (OUT/model) (default: %(default)s)",
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
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="weights dtype; auto is bfloat16 (default: %(default)s)",
    )
    model.add_argument(
        "--adapter-dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the saved adapter weights (default: %(default)s)",
    )
    model.add_argument(
        "--merge",
        action="store_true",
        help="also write OUT/merged: the base model with the adapter merged in, ready for `vllm serve`",
    )
    model.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, ~30%% more time (7B models)",
    )

    sft = parser.add_argument_group("supervised warm-up (TRL SFTTrainer, loss on the answer only)")
    sft.add_argument(
        "--sft-epochs", type=int, default=1, help="epochs over the training rows, 0 to skip (default: %(default)s)"
    )
    sft.add_argument("--batch-size", type=int, default=8, help="rows per SFT step and process (default: %(default)s)")
    sft.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step, SFT and GRPO: less memory, same step (default: %(default)s)",
    )
    sft.add_argument("--lr", type=float, default=2e-4, help="SFT peak learning rate (default: %(default)s)")

    grpo = parser.add_argument_group("GRPO (TRL GRPOTrainer, RSafe's reward 0.9 x accuracy + 0.1 x format)")
    grpo.add_argument("--grpo-steps", type=int, default=0, help="GRPO steps, 0 to skip (default: %(default)s)")
    grpo.add_argument("--rollouts", type=int, default=4, help="samples per prompt (default: %(default)s)")
    grpo.add_argument(
        "--grpo-prompts",
        type=int,
        default=4,
        help="prompts per GRPO step, over all processes; prompts x rollouts must divide by processes x "
        "--grad-accum (default: %(default)s)",
    )
    grpo.add_argument("--grpo-lr", type=float, default=2e-5, help="GRPO learning rate (default: %(default)s)")
    grpo.add_argument(
        "--grpo-beta", type=float, default=0.0, help="KL penalty against the base model (default: %(default)s)"
    )
    grpo.add_argument(
        "--grpo-loss",
        choices=("grpo", "dapo", "dr_grpo", "bnpo"),
        default="dapo",
        help="how token losses are averaged (TRL's loss_type; dapo = verl's token-mean) (default: %(default)s)",
    )
    grpo.add_argument(
        "--temperature", type=float, default=1.0, help="rollout sampling temperature (default: %(default)s)"
    )
    grpo.add_argument("--max-new-tokens", type=int, default=24, help="rollout length cap (default: %(default)s)")
    grpo.add_argument(
        "--rollout-engine",
        choices=("auto", "transformers", "vllm-colocate", "vllm-server"),
        default="auto",
        help="who samples the rollouts: auto is vLLM in the training processes when vllm is installed and "
        "the device is a GPU, else transformers' generate (default: %(default)s)",
    )
    grpo.add_argument(
        "--vllm-server-url", metavar="URL", help="a `trl vllm-serve` server, for --rollout-engine vllm-server"
    )
    grpo.add_argument(
        "--vllm-gpu-memory",
        type=float,
        default=0.3,
        metavar="FRACTION",
        help="GPU memory share of the colocated vLLM (default: %(default)s)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="cpu, or cuda / auto (the GPUs accelerate assigns) (default: %(default)s)",
    )
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
