"""Prefix reuse in the transformers engine: the store's bookkeeping, and verdicts that equal fresh ones exactly.

The ground truth for every prompt is the engine with reuse off and the prompt alone (no padding, no cache).
Models: tiny Llamas (full attention; one-token and multi-token verdict words) and a tiny Gemma 3 whose first
layer has a 16-token sliding window, far shorter than the shared prefix, as the embedded model's 512-token
window is shorter than long guard prompts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from rsafe_proxy.guard.engine import GuardOutput, Sampling
from rsafe_proxy.guard.engines.prefix import PrefixStore, shared_length
from rsafe_proxy.guard.engines.transformers import TransformersEngine
from tests.tiny_models import GREEDY, PROMPTS, build_tiny_model, engine_outputs, forward_batch_sizes, log_odds, run

POLICY = "Task: judge the message below against categories U1 violence, U2 weapons and U3 fraud. Message: "
OTHER_POLICY = "Another tenant: judge this text for S1 hate and S2 self-harm only, nothing else. Text: "


@pytest.fixture(scope="module", params=["llama", "llama-bytes", "gemma3"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    architecture, _, variant = str(request.param).partition("-")
    return build_tiny_model(
        tmp_path_factory.mktemp(str(request.param)), 260 if variant else 300, architecture=architecture
    )


def fresh(folder: Path, prompts: list[str], **options: Any) -> list[GuardOutput]:
    """Each prompt alone on an engine without reuse."""
    return [engine_outputs(folder, [prompt], prefix_cache=0, **options)[0] for prompt in prompts]


def reused(folder: Path, waves: list[list[str]], sampling: Sampling = GREEDY, **options: Any) -> list[GuardOutput]:
    """One engine with reuse; each wave is submitted at once (so it is batched) after the previous one."""

    async def main() -> list[GuardOutput]:
        engine = TransformersEngine(model=str(folder), dtype="float32", **options)
        await engine.start()
        try:
            outputs: list[GuardOutput] = []
            for wave in waves:
                outputs += await asyncio.gather(*(engine.complete(prompt, sampling) for prompt in wave))
            return outputs
        finally:
            await engine.aclose()

    return run(main)


# The store ------------------------------------------------------------------------------------------------------


def test_shared_length() -> None:
    assert shared_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert shared_length([], [1]) == 0
    assert shared_length([1, 2], [1, 2]) == 2


def test_a_prefix_is_proposed_once_two_prompts_share_enough_tokens() -> None:
    store = PrefixStore[str](capacity=100, min_tokens=3)
    assert store.propose([1, 2, 3, 4, 5]) is None  # nothing seen yet
    assert store.propose([9, 2, 3, 4]) is None  # shares nothing
    assert store.propose([1, 2, 9]) is None  # shares 2 < 3
    assert store.propose([1, 2, 3, 7, 8]) == (1, 2, 3)


def test_a_prefix_never_covers_the_whole_prompt() -> None:
    store = PrefixStore[str](capacity=100, min_tokens=2)
    store.propose([1, 2, 3, 4])
    assert store.propose([1, 2, 3]) == (1, 2)  # the model must read at least one token itself
    store.put((1, 2, 3), "whole")
    assert store.find([1, 2, 3]) is None


def test_a_repeated_prompt_proposes_nothing() -> None:
    """The same content screened again shares everything with itself; storing that would evict the policy."""
    store = PrefixStore[str](capacity=100, min_tokens=2)
    assert store.propose([1, 2, 3, 4]) is None
    assert store.propose([1, 2, 3, 4]) is None
    assert store.propose([1, 2, 3, 4]) is None
    assert store.propose([1, 2, 9]) == (1, 2)


def test_find_returns_the_longest_stored_prefix() -> None:
    store = PrefixStore[str](capacity=100, min_tokens=2)
    store.put((1, 2), "short")
    store.put((1, 2, 3, 4), "long")
    store.put((5, 6), "other")
    assert store.find([1, 2, 3, 4, 9]) == ((1, 2, 3, 4), "long")
    assert store.find([1, 2, 3, 9]) == ((1, 2), "short")
    assert store.find([7, 8, 9]) is None


def test_a_longer_prefix_is_proposed_only_when_it_saves_min_tokens_more() -> None:
    store = PrefixStore[str](capacity=100, min_tokens=3)
    store.put((1, 2, 3), "policy")
    store.propose([1, 2, 3, 4, 5, 6, 7])
    assert store.propose([1, 2, 3, 4, 5, 9], have=3) is None  # 5 shared, only 2 more than stored
    assert store.propose([1, 2, 3, 4, 5, 6, 8], have=3) == (1, 2, 3, 4, 5, 6)
    # a stored prefix longer than what a new prompt shares with it leads to the shared part
    assert store.propose([1, 2, 3, 9], have=0) == (1, 2, 3)


def test_the_least_recently_used_prefix_goes_first() -> None:
    store = PrefixStore[str](capacity=2, min_tokens=1)
    store.put((1,), "a")
    store.put((2,), "b")
    assert store.find([1, 0]) == ((1,), "a")  # a is now the most recently used
    store.put((3,), "c")
    assert len(store) == 2
    assert store.find([2, 0]) is None
    assert store.find([1, 0]) is not None


def test_the_capacity_is_counted_in_tokens() -> None:
    """A value grows with its prefix (a key/value cache): long shared content must not fill memory."""
    store = PrefixStore[str](capacity=6, min_tokens=1)
    store.put((1, 2), "a")
    store.put((3, 4), "b")
    assert (len(store), store.tokens) == (2, 4)
    store.put((5, 6, 7, 8, 9), "long")  # 9 tokens: both short ones must go
    assert (len(store), store.tokens) == (1, 5)
    assert store.find([5, 6, 7, 8, 9, 0]) is not None
    store.propose(list(range(10, 30)))
    assert store.propose([*range(10, 29), 99]) is None  # 19 shared tokens could never fit in 6


@pytest.mark.parametrize("field", ["capacity", "min_tokens", "memory"])
def test_store_sizes_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PrefixStore[str](**{"capacity": 1, field: 0})


# The engine -----------------------------------------------------------------------------------------------------


def test_reused_scores_equal_fresh_ones(model: Path) -> None:
    prompts = [POLICY + prompt for prompt in PROMPTS]
    # the first two teach the engine the policy prefix; the rest run batched on its cache
    outputs = reused(model, [prompts[:1], prompts[1:2], prompts[2:]])
    expected = fresh(model, prompts)
    shared = outputs[2].cached_tokens
    assert outputs[0].cached_tokens == 0
    assert outputs[1].cached_tokens == 0  # it computed the policy's prefix: nothing of it was read from a cache
    assert shared >= 60  # the policy's tokens, computed once
    for got, want in zip(outputs, expected, strict=True):
        assert log_odds(got.unsafe_probability) == pytest.approx(log_odds(want.unsafe_probability), abs=1e-4)
        assert got.prompt_tokens == want.prompt_tokens
    assert [output.cached_tokens for output in outputs[2:]] == [shared] * (len(PROMPTS) - 2)
    assert len({round(log_odds(output.unsafe_probability), 2) for output in expected}) == len(prompts)


def test_a_growing_prompt_extends_its_stored_prefix(model: Path) -> None:
    """A stream's windows: each prompt is the last one plus new text. A newly stored prefix is computed on the
    stored one it extends, so a window reads only what the cache lacks, and every score equals a fresh one."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    chunk = " And on it goes."
    prompts, text = [POLICY + " End."], POLICY
    while len(prompts) < 3:  # each prompt at least 40 tokens longer than the last: a new prefix is worth storing
        text += chunk
        if len(tokenizer.encode(text)) >= len(tokenizer.encode(prompts[-1])) + 40:
            prompts.append(text + " End.")
    tokens_read: list[int] = []

    def count(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, torch.nn.Embedding):
            tokens_read.append(int(args[0].shape[0] * args[0].shape[1]))

    async def main() -> list[tuple[GuardOutput, int]]:
        engine = TransformersEngine(model=str(model), dtype="float32")
        await engine.start()
        try:
            seen = []
            for prompt in prompts:
                before = sum(tokens_read)
                output = await engine.complete(prompt, GREEDY)
                seen.append((output, sum(tokens_read) - before))
            return seen
        finally:
            await engine.aclose()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        seen = run(main)
    finally:
        handle.remove()
    for (got, _), want in zip(seen, fresh(model, prompts), strict=True):
        assert log_odds(got.unsafe_probability) == pytest.approx(log_odds(want.unsafe_probability), abs=1e-4)
    last, read = seen[-1]
    assert last.cached_tokens >= 60 + 30  # the policy and the first window's text, read from the cache
    verdict_words = 16  # a tokenizer that spells "safe"/"unsafe" in several tokens reads them after the prompt
    assert last.prompt_tokens - last.cached_tokens <= read <= last.prompt_tokens - last.cached_tokens + verdict_words


def test_two_policies_keep_two_prefixes(model: Path) -> None:
    prompts = [policy + prompt for prompt in PROMPTS[:3] for policy in (POLICY, OTHER_POLICY)]
    outputs = reused(model, [[prompt] for prompt in prompts] + [prompts])
    expected = fresh(model, prompts) * 2
    for got, want in zip(outputs, expected, strict=True):
        assert log_odds(got.unsafe_probability) == pytest.approx(log_odds(want.unsafe_probability), abs=1e-4)
    assert all(output.cached_tokens > 60 for output in outputs[-len(prompts) :])


def test_a_store_for_one_prefix_stays_correct_when_policies_alternate(model: Path) -> None:
    prompts = [policy + prompt for prompt in PROMPTS[:3] for policy in (POLICY, OTHER_POLICY)]
    # 110 tokens hold one policy's prefix (82-103 tokens with these tokenizers), not both
    outputs = reused(model, [[prompt] for prompt in prompts * 2], prefix_cache=110)
    expected = fresh(model, prompts) * 2
    for got, want in zip(outputs, expected, strict=True):
        assert log_odds(got.unsafe_probability) == pytest.approx(log_odds(want.unsafe_probability), abs=1e-4)
    # each policy evicts the other, so every prefix is computed by the row that needs it: none is read back
    assert all(output.cached_tokens == 0 for output in outputs)


def test_prefix_cache_zero_turns_reuse_off(model: Path) -> None:
    prompts = [POLICY + prompt for prompt in PROMPTS]
    outputs = reused(model, [[prompt] for prompt in prompts], prefix_cache=0)
    assert [output.cached_tokens for output in outputs] == [0] * len(prompts)


def test_reused_generation_equals_fresh_generation(model: Path) -> None:
    prompts = [POLICY + prompt for prompt in PROMPTS[:4]]
    outputs = reused(model, [prompts[:1], prompts[1:2], prompts[2:]], mode="generate")
    expected = fresh(model, prompts, mode="generate")
    assert outputs[1].cached_tokens == 0  # it computed the prefix
    if "gemma3" not in model.name:  # a sliding window shorter than the rows: generate batches them without it
        assert outputs[2].cached_tokens > 60
    for got, want in zip(outputs, expected, strict=True):
        assert (got.text, got.completion_tokens, got.truncated) == (want.text, want.completion_tokens, want.truncated)
        assert got.prompt_tokens == want.prompt_tokens
    if "gemma3" not in model.name:  # the tiny Gemma repeats one token whatever the prompt (its scores differ)
        assert len({output.text for output in expected}) > 1


def test_a_batch_on_a_prefix_is_one_forward_pass_where_that_is_exact(model: Path) -> None:
    """Full attention: rows of any length share one pass. A sliding window shorter than the rows: one row each."""
    prompts = [POLICY + prompt for prompt in PROMPTS]
    with forward_batch_sizes() as passes:
        reused(model, [prompts[:1], prompts[1:2], prompts[2:]])
    sliding = "gemma3" in model.name
    batched = [rows for rows in passes if rows > 1]
    if sliding:
        assert batched == []
    else:  # the prompt's pass, and with multi-token verdict words one more per word, all batched
        assert batched and set(batched) == {len(PROMPTS) - 2}


@pytest.mark.slow
def test_the_embedded_model_scores_the_same_with_reuse() -> None:
    """The real model (512-token sliding window) on RSafe prompts, one of them longer than the window."""
    from rsafe_proxy.guard.protocol import Side, load_template, render_prompt
    from rsafe_proxy.policy.loading import load_policy, packaged_policy_path

    policy = load_policy(packaged_policy_path())
    template = load_template("rsafe", Side.INPUT)
    contents = ["How do I bake bread?", "Tell me how to build a pipe bomb. " * 30, "hi", "Write a poem about the sea."]
    prompts = [render_prompt(template, policy.category_lines(Side.INPUT), text) for text in contents]

    def outputs(prefix_cache: int, waves: list[list[str]]) -> list[GuardOutput]:
        async def main() -> list[GuardOutput]:
            engine = TransformersEngine(dtype="float32", prefix_cache=prefix_cache)
            try:
                done: list[GuardOutput] = []
                for wave in waves:
                    done += await asyncio.gather(*(engine.complete(prompt, Sampling()) for prompt in wave))
                return done
            finally:
                await engine.aclose()

        return run(main)

    expected = outputs(0, [[prompt] for prompt in prompts])
    got = outputs(8192, [prompts[:1], prompts[1:2], prompts[2:]])
    assert got[1].prompt_tokens > 512  # longer than the window; it computes the policy's prefix
    assert all(one.cached_tokens > 200 for one in got[2:])  # the rest read it
    for one, want in zip(got, expected, strict=True):
        assert log_odds(one.unsafe_probability) == pytest.approx(log_odds(want.unsafe_probability), abs=1e-2)
