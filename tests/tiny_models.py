"""Tiny random-weight causal LMs built on the spot (a BPE tokenizer trained on a few sentences), and helpers that
run the transformers engine on them. Shared by the engine, prefix-reuse, conformance and vLLM tests."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from rsafe_proxy.guard.engine import GuardOutput, Sampling
from rsafe_proxy.guard.engines.transformers import TransformersEngine

T = TypeVar("T")
PREFIX = "<think>\n</think>\n\\boxed{"
GREEDY = Sampling(temperature=0.0, repetition_penalty=1.0, max_tokens=12)
PROMPTS = [
    "How do I bake bread at home?",
    "Tell me how to build a weapon, step by step, with every detail you know.",
    "Is this safe?",
    "The guard reads the policy and answers safe or unsafe.",
    "hi",
]
SLIDING_WINDOW = 16
# A real template may refuse a conversation (e.g. wrong role order); this one refuses a marker prompt.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['content'] == 'REFUSE' %}{{ raise_exception('refused') }}"
    "{% endif %}user: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}guard:{% endif %}"
)


def build_tiny_model(
    folder: Path, vocab_size: int, template: str | None = TEMPLATE, architecture: str = "llama"
) -> Path:
    """A ~38k-parameter Llama (or Gemma 3 with a 16-token sliding window on its first layer, as the embedded
    model has on most of its layers) and a BPE tokenizer trained on a few sentences (vocab 260 = bytes only)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["Is it \\boxed{safe} or \\boxed{unsafe}?"] * 20 + PROMPTS, trainer)
    torch.manual_seed(0)
    tiny_model(architecture, tokenizer.get_vocab_size()).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    if template is not None:
        settings["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return folder


def tiny_model(architecture: str, vocab_size: int) -> PreTrainedModel:
    shape: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "initializer_range": 0.5,  # large weights: peaked, prompt-dependent outputs, so mistakes show
    }
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=2, max_position_embeddings=256))
    if architecture == "gemma3":
        config = Gemma3TextConfig(
            **shape,
            num_key_value_heads=1,
            head_dim=8,
            query_pre_attn_scalar=8,
            max_position_embeddings=1024,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
        )
        return Gemma3ForCausalLM(config)
    raise ValueError(f"no tiny {architecture}")


def log_odds(probability: float | None) -> float:
    """Compares probabilities near 0 or 1 as finely as those near 0.5."""
    assert probability is not None
    assert 0.0 < probability < 1.0
    return math.log(probability) - math.log1p(-probability)


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


def engine_outputs(folder: Path, prompts: list[str], sampling: Sampling = GREEDY, **options: Any) -> list[GuardOutput]:
    """One engine, all prompts submitted at once (so they are batched), closed afterwards."""

    async def main() -> list[GuardOutput]:
        engine = TransformersEngine(model=str(folder), dtype="float32", **options)
        await engine.start()
        try:
            return list(await asyncio.gather(*(engine.complete(prompt, sampling) for prompt in prompts)))
        finally:
            await engine.aclose()

    return run(main)


@contextmanager
def forward_batch_sizes() -> Iterator[list[int]]:
    """The batch size of every forward pass of any model while the block runs (counted at the embedding)."""
    sizes: list[int] = []

    def count_rows(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, torch.nn.Embedding):
            sizes.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count_rows)
    try:
        yield sizes
    finally:
        handle.remove()
