"""The model side of training: loading a causal LM with LoRA, encoding guard prompts, score-mode verdicts.

Prompts go through the tokenizer's chat template as one user message with the generation prompt, exactly as
the proxy's engines send them; the chat template writes its own BOS, so the text is tokenized without adding
special tokens. Long content is shortened (its end is cut) so that prompt plus answer fit `max_length`; the
instructions and the category block are never cut.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsafe_proxy.datasets import Row
from rsafe_proxy.train.data import TARGET_PREFIX, PromptBuilder, target_text

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ELLIPSIS = " …"


def resolve_model_path(model: str) -> Path:
    """`embedded` is the packaged default guard model (converted and cached on first use); else a local folder."""
    if model == "embedded":
        from rsafe_proxy.guard.embedded import embedded_model_dir

        return embedded_model_dir()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    return path


def torch_dtype(name: str) -> torch.dtype:
    """The parameter dtype: `auto` is bfloat16 (fast on AVX-512-bf16 CPUs and on GPUs)."""
    return {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of the model folder, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"{path} has no chat template; the guard prompt is sent as a chat message")
    return tokenizer


def load_model(path: Path, dtype: torch.dtype, device: str, attention: str = "eager") -> Any:
    """The base causal LM, on `device`, in `dtype`; eager attention by default (exact and fast for short
    sequences on a CPU; `sdpa` on a GPU)."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, local_files_only=True, attn_implementation=attention
    )
    return model.to(device)


def add_lora(model: Any, rank: int, targets: Sequence[str], dropout: float = 0.0) -> Any:
    """`model` wrapped with fresh LoRA adapters (alpha = 2 x rank) on the `targets` it has."""
    from peft import LoraConfig, get_peft_model

    present = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & set(targets))
    if not present:
        raise ValueError(f"none of the LoRA targets {list(targets)} is a module of this model")
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=dropout,
        target_modules=present,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft <= 0.21 reads a property that transformers 5 deprecated; harmless, and not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end the model's turn: `<end_of_turn>` where the vocabulary has it, and EOS."""
    ids = [int(tokenizer.eos_token_id)]
    turn_end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(turn_end, int) and turn_end != tokenizer.unk_token_id and turn_end not in ids:
        ids.insert(0, turn_end)
    return ids


@dataclass(frozen=True)
class Encoded:
    """A row's token ids: the chat-templated prompt, and the answer trained on."""

    row: Row
    prompt_ids: list[int]
    target_ids: list[int]


class Encoder:
    """Turns rows into token ids with the proxy's templates, shortening long content to fit `max_length`.

    Each row is rendered with the family named in `row.template` (the first of `builders` when empty).
    """

    def __init__(self, tokenizer: Any, builders: Mapping[str, PromptBuilder], max_length: int) -> None:
        if not builders:
            raise ValueError("at least one template family is needed")
        self.tokenizer = tokenizer
        self.builders = dict(builders)
        self.default = next(iter(self.builders))
        self.max_length = max_length
        self.stop_ids = end_of_turn_ids(tokenizer)

    def tokens(self, text: str) -> list[int]:
        """Token ids of `text` without added special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_text(self, rendered: str) -> str:
        """`rendered` as the single user message of a chat, followed by the generation prompt."""
        return str(
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": rendered}], add_generation_prompt=True, tokenize=False
            )
        )

    def prompt_ids(self, row: Row, reserve: int) -> list[int]:
        """The chat prompt of `row`, content shortened so that `reserve` more tokens fit in `max_length`."""
        return self.tokens(self.chat_text(self.user_message(row, reserve)))

    def user_message(self, row: Row, reserve: int) -> str:
        """The rendered guard prompt of `row` (the chat's one user message), content shortened so that its chat
        prompt and `reserve` more tokens fit in `max_length`."""
        budget = self.max_length - reserve
        prompt, response = row.prompt, row.response or ""
        builder = self.builders[row.template or self.default]
        text = builder.render(row)
        ids = self.tokens(self.chat_text(text))
        for _ in range(4):
            overflow = len(ids) - budget
            if overflow <= 0:
                return text
            prompt, response = self._shorten(row, prompt, response, overflow + 4)
            text = builder.render(row, prompt, response)
            ids = self.tokens(self.chat_text(text))
        if len(ids) > budget:
            raise ValueError(f"row {row.id}: the template alone needs {len(ids)} tokens; raise --max-length")
        return text

    def _shorten(self, row: Row, prompt: str, response: str, overflow: int) -> tuple[str, str]:
        prompt_ids, response_ids = self.tokens(prompt), self.tokens(response)
        if row.task == "response" and response_ids:
            # cut both in proportion to their length, keeping at least 16 tokens of the prompt
            total = len(prompt_ids) + len(response_ids)
            cut_prompt = min(len(prompt_ids), round(overflow * len(prompt_ids) / total))
            if len(prompt_ids) - cut_prompt < 16 and len(prompt_ids) > 16:
                cut_prompt = len(prompt_ids) - 16
            cut_response = overflow - cut_prompt
            return self._cut(prompt, prompt_ids, cut_prompt), self._cut(response, response_ids, cut_response)
        return self._cut(prompt, prompt_ids, overflow), response

    def _cut(self, text: str, ids: list[int], count: int) -> str:
        if count <= 0:
            return text
        keep = max(0, len(ids) - count - len(self.tokens(ELLIPSIS)))
        return str(self.tokenizer.decode(ids[:keep])).rstrip() + ELLIPSIS

    def encode(self, row: Row) -> Encoded:
        """The row's prompt ids and its answer ids (`<think>\\n</think>\\n\\boxed{label}` and the turn end)."""
        target = self.tokens(target_text(row.label)) + self.stop_ids[:1]
        return Encoded(row, self.prompt_ids(row, len(target)), target)

    def score_ids(self, row: Row) -> list[int]:
        """The prompt ids followed by the forced answer prefix whose next token score mode reads."""
        prefix = self.tokens(TARGET_PREFIX)
        return self.prompt_ids(row, len(prefix) + 1) + prefix


def label_token_ids(tokenizer: Any) -> tuple[int, int]:
    """(safe, unsafe): the first token of each label right after `\\boxed{`."""
    prefix = list(tokenizer(TARGET_PREFIX, add_special_tokens=False)["input_ids"])
    firsts = []
    for label in ("safe", "unsafe"):
        ids = list(tokenizer(TARGET_PREFIX + label, add_special_tokens=False)["input_ids"])
        if ids[: len(prefix)] != prefix or len(ids) == len(prefix):
            raise ValueError(f"the tokenizer merges {label!r} into the answer prefix; score mode cannot read it")
        firsts.append(ids[len(prefix)])
    if firsts[0] == firsts[1]:
        raise ValueError("'safe' and 'unsafe' start with the same token; score mode cannot tell them apart")
    return firsts[0], firsts[1]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with sequences aligned to the right, for next-token reading and generation."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for index, sequence in enumerate(sequences):
        if sequence:
            ids[index, width - len(sequence) :] = torch.tensor(list(sequence), dtype=torch.long)
            mask[index, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each sequence's first real token (left padding)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


@torch.no_grad()
def unsafe_probabilities(
    model: Any, encoder: Encoder, rows: Sequence[Row], batch_size: int, device: str, progress: Any = None
) -> list[float]:
    """Score mode: P(unsafe) / (P(safe) + P(unsafe)) at the forced `\\boxed{`, one per row."""
    safe_id, unsafe_id = label_token_ids(encoder.tokenizer)
    was_training = model.training
    model.eval()
    encoded = [encoder.score_ids(row) for row in rows]
    # longest first, so that each batch pads little
    order = sorted(range(len(rows)), key=lambda index: -len(encoded[index]))
    result = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_pad([encoded[index] for index in chunk], encoder.tokenizer.pad_token_id, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=1).logits[
            :, -1, :
        ]
        pair = torch.stack([logits[:, safe_id], logits[:, unsafe_id]], dim=-1).float()
        probabilities = torch.softmax(pair, dim=-1)[:, 1].tolist()
        for index, probability in zip(chunk, probabilities, strict=True):
            result[index] = float(probability)
        if progress is not None:
            progress.update(len(chunk))
    model.train(was_training)
    return result
