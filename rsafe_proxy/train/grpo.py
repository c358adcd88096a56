"""GRPO with RSafe's rule-based reward, on the LoRA parameters.

Each step samples `rollouts` answers for each of a few prompts from the current policy, scores them with
`reward.reward` (0.9 x accuracy + 0.1 x format), and normalizes the rewards within each prompt's group
(advantage = (r - mean) / (std + eps)). With one update per batch of rollouts the policy ratio is 1, so the
clipped surrogate of GRPO reduces to the policy gradient: minimize -A x mean log-probability of the answer
tokens, plus an optional KL penalty (k3 estimator) against the base model (the adapter switched off).
Groups whose rollouts all got the same reward carry no signal and are not back-propagated.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rsafe_proxy.datasets import Row
from rsafe_proxy.train.checkpoint import RunState
from rsafe_proxy.train.modeling import Encoder, left_pad, positions
from rsafe_proxy.train.reward import accuracy_reward, format_reward, reward
from rsafe_proxy.train.sft import learning_rate


@dataclass(frozen=True)
class GrpoSettings:
    """Steps, prompts per step, rollouts per prompt, sampling, learning rate, KL weight, checkpoint period."""

    steps: int
    prompts_per_step: int
    rollouts: int
    lr: float
    max_new_tokens: int
    temperature: float
    beta: float
    checkpoint_every: int
    seed: int


def group_advantages(rewards: Sequence[float], group_size: int, eps: float = 1e-4) -> list[float]:
    """(r - group mean) / (group std + eps) for consecutive groups of `group_size` rewards (population std)."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not form groups of {group_size}")
    advantages: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((value - mean) ** 2 for value in group) / len(group))
        advantages.extend((value - mean) / (std + eps) for value in group)
    return advantages


def prompt_order(count: int, step: int, per_step: int, seed: int) -> list[int]:
    """The example indexes of GRPO step `step`: consecutive slices of seeded shuffles, one shuffle per pass."""
    indexes = []
    for position in range(step * per_step, (step + 1) * per_step):
        cycle, offset = divmod(position, count)
        order = list(range(count))
        random.Random(seed * 7_919 + cycle).shuffle(order)
        indexes.append(order[offset])
    return indexes


def answer_mask(completions: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """1 for each generated token up to and including the first stop token, 0 after it."""
    is_stop = torch.zeros_like(completions, dtype=torch.bool)
    for stop in stop_ids:
        is_stop |= completions == stop
    stops_before = torch.cumsum(is_stop.long(), dim=-1) - is_stop.long()
    return (stops_before == 0).long()


@torch.no_grad()
def sample_rollouts(
    model: Any, encoder: Encoder, rows: Sequence[Row], settings: GrpoSettings, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(prompt ids, prompt mask, completion ids, completion texts); rollouts of a prompt are consecutive."""
    tokenizer = encoder.tokenizer
    prompts = [encoder.prompt_ids(row, settings.max_new_tokens) for row in rows]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
    model.eval()
    output = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=settings.temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=settings.max_new_tokens,
        num_return_sequences=settings.rollouts,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=encoder.stop_ids,
    )
    model.train()
    completions = output[:, ids.shape[1] :]
    keep = answer_mask(completions, encoder.stop_ids)
    texts = []
    for sequence, sequence_mask in zip(completions.tolist(), keep.tolist(), strict=True):
        tokens = [token for token, kept in zip(sequence, sequence_mask, strict=True) if kept]
        if tokens and tokens[-1] in encoder.stop_ids:
            tokens = tokens[:-1]
        texts.append(str(tokenizer.decode(tokens, skip_special_tokens=True)))
    repeated_ids = ids.repeat_interleave(settings.rollouts, dim=0)
    repeated_mask = mask.repeat_interleave(settings.rollouts, dim=0)
    return repeated_ids, repeated_mask, completions, texts


def completion_log_probs(
    model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities of each completion token under `model` (batch x completion length)."""
    ids = torch.cat([prompt_ids, completions], dim=1)
    mask = torch.cat([prompt_mask, keep], dim=1)
    width = completions.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=width + 1).logits
    log_probs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    return log_probs.gather(-1, completions.unsqueeze(-1)).squeeze(-1)


def policy_loss(
    log_probs: torch.Tensor,
    keep: torch.Tensor,
    advantages: torch.Tensor,
    reference_log_probs: torch.Tensor | None,
    beta: float,
) -> torch.Tensor:
    """GRPO's loss: mean over sequences of the mean over answer tokens of -A x log p (+ beta x KL_k3)."""
    per_token = -advantages.unsqueeze(-1) * log_probs
    if reference_log_probs is not None and beta:
        delta = reference_log_probs - log_probs
        per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    weights = keep.float()
    return ((per_token * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1)).mean()


def run_grpo(
    model: Any,
    optimizer: torch.optim.Optimizer,
    encoder: Encoder,
    rows: Sequence[Row],
    settings: GrpoSettings,
    state: RunState,
    device: str,
    on_step: Callable[[dict[str, Any]], None],
    on_checkpoint: Callable[[], None],
    progress: Any = None,
) -> None:
    """GRPO steps from `state.grpo_steps` to `settings.steps`, one optimizer step per batch of rollouts."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    while state.grpo_steps < settings.steps:
        # seeded per step, so a resumed run samples what an uninterrupted one would
        torch.manual_seed(settings.seed * 1_000_003 + state.grpo_steps)
        batch = [
            rows[index] for index in prompt_order(len(rows), state.grpo_steps, settings.prompts_per_step, settings.seed)
        ]
        prompt_ids, prompt_mask, completions, texts = sample_rollouts(model, encoder, batch, settings, device)
        golds = [row.label for row in batch for _ in range(settings.rollouts)]
        rewards = [reward(text, gold) for text, gold in zip(texts, golds, strict=True)]
        advantages = group_advantages(rewards, settings.rollouts)
        informative = [index for index, value in enumerate(advantages) if abs(value) > 1e-6]
        lr = learning_rate(settings.lr, state.grpo_steps, settings.steps, 0.0)
        loss_value = 0.0
        if informative:
            for group in optimizer.param_groups:
                group["lr"] = lr
            chosen = torch.tensor(informative, device=completions.device)
            keep = answer_mask(completions, encoder.stop_ids)[chosen]
            log_probs = completion_log_probs(model, prompt_ids[chosen], prompt_mask[chosen], completions[chosen], keep)
            reference = None
            if settings.beta:
                with torch.no_grad(), model.disable_adapter():
                    reference = completion_log_probs(
                        model, prompt_ids[chosen], prompt_mask[chosen], completions[chosen], keep
                    )
            weights = torch.tensor([advantages[index] for index in informative], device=log_probs.device)
            loss = policy_loss(log_probs, keep, weights, reference, settings.beta)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            loss_value = float(loss.item())
            state.tokens += int(prompt_mask[chosen].sum().item() + keep.sum().item())
        state.grpo_steps += 1
        mean_reward = sum(rewards) / len(rewards)
        accuracy = sum(accuracy_reward(t, g) for t, g in zip(texts, golds, strict=True)) / len(texts)
        formatted = sum(format_reward(text) for text in texts) / len(texts)
        state.remember("grpo_reward", mean_reward)
        on_step(
            {
                "phase": "grpo",
                "step": state.grpo_steps,
                "reward": round(mean_reward, 4),
                "accuracy": round(accuracy, 4),
                "format": round(formatted, 4),
                "informative": len(informative),
                "loss": round(loss_value, 5),
                "lr": lr,
                "sample": texts[0][:120],
            }
        )
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{mean_reward:.3f}", acc=f"{accuracy:.2f}", fmt=f"{formatted:.2f}")
        if settings.checkpoint_every and state.grpo_steps % settings.checkpoint_every == 0:
            on_checkpoint()
