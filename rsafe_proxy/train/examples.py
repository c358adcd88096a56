"""The training rows as TRL datasets, rendered with the proxy's templates by `modeling.Encoder`.

SFT rows are pre-tokenized (`input_ids` = chat prompt + answer, `completion_mask` = 1 on the answer), so
SFTTrainer trains on exactly the ids the encoder builds and computes the loss on the answer only. GRPO rows are
conversations (the rendered guard prompt as the one user message), so the trainer and vLLM apply the chat
template themselves, as the proxy's engines do; `label` goes to the reward function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rsafe_proxy.datasets import Row
from rsafe_proxy.train.modeling import Encoder


def sft_dataset(encoder: Encoder, rows: Sequence[Row]) -> Any:
    """A `datasets.Dataset` of `input_ids` and `completion_mask`, one row per training row."""
    from datasets import Dataset

    records: dict[str, list[list[int]]] = {"input_ids": [], "completion_mask": []}
    for row in rows:
        encoded = encoder.encode(row)
        records["input_ids"].append(encoded.prompt_ids + encoded.target_ids)
        records["completion_mask"].append([0] * len(encoded.prompt_ids) + [1] * len(encoded.target_ids))
    return Dataset.from_dict(records)


def grpo_dataset(encoder: Encoder, rows: Sequence[Row], max_new_tokens: int) -> Any:
    """A `datasets.Dataset` of `prompt` (a one-message conversation) and `label`, content shortened so that the
    prompt and `max_new_tokens` fit in the encoder's max length."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": encoder.user_message(row, max_new_tokens)}] for row in rows],
            "label": [row.label for row in rows],
        }
    )


def token_count(dataset: Any) -> int:
    """Tokens in a pre-tokenized dataset (one epoch)."""
    return sum(len(ids) for ids in dataset["input_ids"])
