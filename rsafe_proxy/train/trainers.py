"""The two training phases on TRL: SFTTrainer (loss on the answer only) and GRPOTrainer (RSafe's rule-based
reward, rollouts by vLLM or transformers), with LoRA (peft) or every weight trained.

accelerate decides the processes and devices (`accelerate launch --config_file adapters/train/...`); DeepSpeed
ZeRO-3 or FSDP come from that config, not from here. Each phase checkpoints with the trainer's own checkpoints
(weights, optimizer, scheduler, RNG states) and resumes from them.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rsafe_proxy.train import modeling
from rsafe_proxy.train.callbacks import QuietProgressCallback, StepLogCallback, StopCallback
from rsafe_proxy.train.checkpoint import KEEP, StepLog, checkpoint_dir
from rsafe_proxy.train.options import TrainOptions
from rsafe_proxy.train.reward import REWARD_FUNCTIONS, REWARD_WEIGHTS


def on_gpu(options: TrainOptions) -> bool:
    """True when training runs on CUDA devices."""
    import torch

    return options.device != "cpu" and torch.cuda.is_available()


def trainable_model(options: TrainOptions, model_path: Path, start: Path | None, stop_ids: Sequence[int]) -> Any:
    """The model to train, on the CPU (the trainer places it): the base with fresh LoRA adapters, or with the
    adapter of an earlier stage (`start`) made trainable; with `--finetune full`, `start` or the base itself.
    Generation stops at the end of the turn."""
    dtype = modeling.torch_dtype(options.dtype)
    attention = "sdpa" if on_gpu(options) else "eager"
    if options.finetune == "full":
        model = modeling.load_model(start or model_path, dtype, "cpu", attention)
        model.generation_config.eos_token_id = list(stop_ids)
        return model
    base = modeling.load_model(model_path, dtype, "cpu", attention)
    base.generation_config.eos_token_id = list(stop_ids)
    if options.gradient_checkpointing:
        base.enable_input_require_grads()  # LoRA on a frozen base: checkpointed blocks need a grad-carrying input
    if start is None:
        return modeling.add_lora(base, options.lora_r, options.lora_targets)
    from peft import PeftModel

    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, str(start), is_trainable=True)


def _common(options: TrainOptions, output_dir: Path) -> dict[str, Any]:
    """Trainer arguments both phases share: logging every step, checkpoints, precision, seeds, devices."""
    return {
        "output_dir": str(output_dir),
        "logging_steps": 1,
        "save_strategy": "steps" if options.checkpoint_every else "no",
        "save_steps": options.checkpoint_every or 1,
        "save_total_limit": KEEP,
        "seed": options.seed,
        "data_seed": options.seed,
        "report_to": "none",
        "disable_tqdm": not options.progress,
        "use_cpu": options.device == "cpu",
        "bf16": on_gpu(options) and modeling.torch_dtype(options.dtype) == modeling.torch_dtype("bfloat16"),
        "fp16": False,
        "activation_checkpointing": options.gradient_checkpointing,
        "gradient_accumulation_steps": options.grad_accum,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "dataloader_num_workers": 0,
        "lr_scheduler_type": "linear",
    }


def sft_trainer(options: TrainOptions, load: Callable[[], Any], tokenizer: Any, dataset: Any, out: Path) -> Any:
    """TRL's SFTTrainer on the pre-tokenized rows (`examples.sft_dataset`): answer tokens only in the loss, peak
    learning rate `--lr` after a 5% warm-up, then linear decay. The model comes from `load()`, called after the
    trainer's arguments exist, so that under ZeRO-3 it is loaded sharded (zero3_init_flag)."""
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    config = SFTConfig(
        **_common(options, checkpoint_dir(out, "sft")),
        num_train_epochs=options.sft_epochs,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.lr,
        warmup_steps=0.05,
        completion_only_loss=True,
        max_length=None,  # the encoder already shortened every row to --max-length
        packing=False,
    )
    return SFTTrainer(model=load(), args=config, train_dataset=dataset, processing_class=tokenizer)


def rollout_engine(options: TrainOptions) -> str:
    """transformers, vllm-colocate or vllm-server: `auto` is colocated vLLM when it is installed and the device
    is a GPU, else transformers' generate."""
    if options.rollout_engine != "auto":
        return options.rollout_engine
    return "vllm-colocate" if on_gpu(options) and importlib.util.find_spec("vllm") is not None else "transformers"


def grpo_trainer(
    options: TrainOptions,
    load: Callable[[], Any],
    tokenizer: Any,
    dataset: Any,
    out: Path,
    processes: int,
    stop_ids: Sequence[int],
) -> Any:
    """TRL's GRPOTrainer: `--grpo-prompts` prompts x `--rollouts` samples per optimizer step over all
    processes, rewards 0.9 x accuracy + 0.1 x format normalized within each prompt's group, one update per
    batch of rollouts (on-policy), linear decay of `--grpo-lr`. The model comes from `load()`, as for SFT."""
    from trl.trainer.grpo_config import GRPOConfig
    from trl.trainer.grpo_trainer import GRPOTrainer

    per_step = options.completions_per_step
    if per_step % (processes * options.grad_accum):
        raise ValueError(
            f"--grpo-prompts x --rollouts ({per_step}) must divide by processes x --grad-accum "
            f"({processes} x {options.grad_accum})"
        )
    engine = rollout_engine(options)
    rollouts: dict[str, Any] = {"use_vllm": engine != "transformers"}
    if engine != "transformers":
        rollouts.update(
            vllm_mode="server" if engine == "vllm-server" else "colocate",
            vllm_server_base_url=options.vllm_server_url,
            vllm_gpu_memory_utilization=options.vllm_gpu_memory,
            vllm_max_model_length=options.max_length,
            generation_kwargs={"stop_token_ids": list(stop_ids)},
        )
    config = GRPOConfig(
        **_common(options, checkpoint_dir(out, "grpo")),
        **rollouts,
        max_steps=options.grpo_steps,
        per_device_train_batch_size=per_step // (processes * options.grad_accum),
        num_generations=options.rollouts,
        max_completion_length=options.max_new_tokens,
        temperature=options.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=options.grpo_lr,
        beta=options.grpo_beta,
        loss_type=options.grpo_loss,
        scale_rewards="group",
        reward_weights=list(REWARD_WEIGHTS),
        num_iterations=1,
        disable_dropout=True,
        remove_unused_columns=False,
        shuffle_dataset=True,
        log_completions=False,
    )
    rewards: list[Any] = list(REWARD_FUNCTIONS)
    return GRPOTrainer(
        model=load(),
        reward_funcs=rewards,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def run_phase(trainer: Any, phase: str, log: StepLog, stopper: StopCallback, resume_from: Path | None) -> None:
    """Train to the phase's end (or a stop rule), logging each step; from `resume_from` when given."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    if not trainer.args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgressCallback())
    trainer.add_callback(StepLogCallback(log, phase))
    trainer.add_callback(stopper)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)


def free_memory() -> None:
    """Give back what finished trainers held (their models, optimizer states, a colocated vLLM), before the
    evaluation loads the written model."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
