"""Supervised warm-up on labels: teach the answer `<think>\\n</think>\\n\\boxed{label}` and the turn end.

The loss is the cross-entropy of the answer tokens only (the prompt is context), summed over each answer and
averaged over the batch, so the one token that carries the label is not diluted by the format tokens around
it. Only the logits of the answer positions are computed, which matters with a 262k-token vocabulary.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rsafe_proxy.train.checkpoint import RunState
from rsafe_proxy.train.modeling import Encoded, left_pad, positions


@dataclass(frozen=True)
class SftSettings:
    """Epochs, batch size, peak learning rate (linear warm-up, then linear decay to 10%), checkpoint period."""

    epochs: int
    batch_size: int
    lr: float
    checkpoint_every: int
    seed: int
    warmup_fraction: float = 0.05


def learning_rate(peak: float, step: int, total: int, warmup_fraction: float) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: warm-up, then decay to 10% of `peak`."""
    warmup = max(1, math.ceil(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    remaining = max(1, total - warmup)
    return peak * (1.0 - 0.9 * min(1.0, (step - warmup) / remaining))


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of example indexes) of one epoch: a seeded shuffle, the same on every resume."""
    order = list(range(count))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[start : start + batch_size] for start in range(0, count, batch_size)]


def answer_loss(model: Any, batch: Sequence[Encoded], pad_id: int, device: str) -> tuple[torch.Tensor, int]:
    """(summed answer cross-entropy / batch size, tokens processed) for one batch."""
    sequences = [example.prompt_ids + example.target_ids for example in batch]
    ids, mask = left_pad(sequences, pad_id, device)
    longest = max(len(example.target_ids) for example in batch)
    # left padding aligns every answer to the end: the last `longest + 1` positions predict all answer tokens
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=longest + 1).logits
    logits = logits[:, -longest - 1 : -1, :].float()
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    for index, example in enumerate(batch):
        labels[index, longest - len(example.target_ids) :] = torch.tensor(example.target_ids, dtype=torch.long)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.to(logits.device).reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss / len(batch), int(mask.sum().item())


def run_sft(
    model: Any,
    optimizer: torch.optim.Optimizer,
    examples: Sequence[Encoded],
    settings: SftSettings,
    state: RunState,
    pad_id: int,
    device: str,
    on_step: Callable[[dict[str, Any]], None],
    on_checkpoint: Callable[[], None],
    progress: Any = None,
) -> None:
    """Train from `state.epoch`/`state.batch_index` to the end of the last epoch, one optimizer step a batch."""
    batches_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total = batches_per_epoch * settings.epochs
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    model.train()
    while state.epoch < settings.epochs:
        batches = epoch_batches(len(examples), settings.batch_size, settings.seed, state.epoch)
        while state.batch_index < len(batches):
            batch = [examples[index] for index in batches[state.batch_index]]
            lr = learning_rate(settings.lr, state.sft_steps, total, settings.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, tokens = answer_loss(model, batch, pad_id, device)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            state.batch_index += 1
            state.sft_steps += 1
            state.tokens += tokens
            value = float(loss.item())
            state.remember("sft_loss", value)
            on_step(
                {
                    "phase": "sft",
                    "step": state.sft_steps,
                    "epoch": state.epoch,
                    "loss": round(value, 5),
                    "lr": lr,
                    "grad_norm": round(float(norm), 4),
                    "tokens": tokens,
                }
            )
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{value:.4f}", epoch=state.epoch)
            if settings.checkpoint_every and state.sft_steps % settings.checkpoint_every == 0:
                on_checkpoint()
        state.epoch += 1
        state.batch_index = 0
