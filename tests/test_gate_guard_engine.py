"""The transformers engine as a shared, fair, tenant-isolated resource, run for real on a tiny model: its queue,
its context limit and its prefix store (salted per tenant). The guard's other units: test_gate_guard.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rsafe_proxy.guard.conversation import ROLES
from rsafe_proxy.guard.engine import GuardContextExceeded, GuardEngineError, Sampling
from rsafe_proxy.guard.engines.openai import OpenAIEngine
from rsafe_proxy.guard.engines.prefix import PrefixStore
from rsafe_proxy.guard.engines.transformers import TransformersEngine
from tests.test_gate_guard import POLICY, _policy
from tests.tiny_models import GREEDY, build_tiny_model, forward_batch_sizes, run

# -- the transformers engine, for real on a tiny model --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("gate-tiny"), vocab_size=300)


def test_one_long_request_does_not_hold_up_a_short_one(tiny: Path) -> None:
    """Twelve segments of one request, then a one-line prompt: FIFO would run the prompt last; the fair queue
    runs it in the first batch."""

    async def main() -> list[str]:
        engine = TransformersEngine(model=str(tiny), dtype="float32", max_batch=2, prefix_cache=0)
        await engine.start()
        finished: list[str] = []

        async def judge(name: str, requester: str) -> None:
            await engine.complete(f"segment {name} of a long text", GREEDY, requester=requester)
            finished.append(name)

        try:
            tasks = [asyncio.ensure_future(judge(f"long-{n}", "long")) for n in range(12)]
            tasks.append(asyncio.ensure_future(judge("short", "short")))
            await asyncio.gather(*tasks)
        finally:
            await engine.aclose()
        return finished

    finished = run(main)
    assert finished.index("short") < 2, finished


def test_a_request_whose_caller_gave_up_is_never_run(tiny: Path) -> None:
    """A timed-out screen cancels its queued calls: the model never runs them (one forward pass per verdict)."""

    async def main() -> None:
        engine = TransformersEngine(model=str(tiny), dtype="float32", max_batch=1, prefix_cache=0)
        await engine.start()
        try:
            first = asyncio.ensure_future(engine.complete("first", GREEDY, requester="a"))
            gone = [asyncio.ensure_future(engine.complete(f"gone {n}", GREEDY, requester="b")) for n in range(5)]
            await asyncio.sleep(0)  # all six are queued
            for task in gone:
                task.cancel()
            await first
            assert (await engine.complete("after", GREEDY, requester="c")).prompt_tokens > 0
        finally:
            await engine.aclose()

    with forward_batch_sizes() as sizes:
        run(main)
    assert sizes == [1, 1]


def test_a_prompt_longer_than_the_model_is_refused_as_too_long(tiny: Path) -> None:
    async def main() -> None:
        engine = TransformersEngine(model=str(tiny), dtype="float32")
        await engine.start()
        try:
            with pytest.raises(GuardContextExceeded):
                await engine.complete("word " * 400, GREEDY)  # the tiny model has 256 positions
            assert (await engine.complete("hi", GREEDY)).prompt_tokens > 0
        finally:
            await engine.aclose()

    run(main)


def test_stored_prefixes_are_never_shared_across_tenants(tiny: Path) -> None:
    policy = "Task: judge the message below against categories U1 violence, U2 weapons and U3 fraud. Message: "

    async def main() -> list[int]:
        engine = TransformersEngine(model=str(tiny), dtype="float32", mode="score")
        await engine.start()
        cached = []
        try:
            for salt, text in [("a", "one"), ("a", "two"), ("b", "three"), ("b", "four"), ("a", "five"), ("b", "six")]:
                output = await engine.complete(policy + text, GREEDY, cache_salt=salt)
                cached.append(output.cached_tokens)
        finally:
            await engine.aclose()
        return cached

    cached = run(main)
    assert cached[:2] == [0, 0]  # tenant a's second screen computes its policy's prefix
    assert cached[2] == 0  # tenant b's first screen reads nothing of tenant a's: no timing to learn from
    assert cached[3] == 0  # b computes its own
    assert cached[4] > 0 and cached[5] > 0  # and each tenant then reads its own


def test_the_prefix_store_keeps_salts_apart() -> None:
    store = PrefixStore[str](capacity=100, min_tokens=2)
    store.propose([1, 2, 3, 4], salt="a")
    assert store.propose([1, 2, 3, 9], salt="b") is None  # b has seen nothing
    assert store.propose([1, 2, 3, 8], salt="a") == (1, 2, 3)
    store.put((1, 2, 3), "a's cache", salt="a")
    assert store.find([1, 2, 3, 7], salt="b") is None
    assert store.find([1, 2, 3, 7], salt="a") == ((1, 2, 3), "a's cache")


def test_the_roles_a_policy_can_name_are_the_schema_s() -> None:
    assert POLICY.input_roles == ROLES
    with pytest.raises(ValueError, match="must include 'user'"):
        _policy(input_roles=["system", "tool"])
    narrowed = _policy(input_roles=["user", "system"])
    assert not narrowed.judges_role("tool") and narrowed.judges_role("user")
    assert narrowed.judges_role("ipython")  # a role the policy cannot name is always judged


@pytest.mark.anyio
async def test_a_text_json_cannot_carry_is_a_guard_failure_not_a_crash() -> None:
    # bodies.parse_json refuses half a surrogate pair; one reaching the guard by any other way fails the verdict
    # (the screen then fails closed) instead of raising UnicodeEncodeError out of the engine (a 500)
    engine = OpenAIEngine("http://127.0.0.1:9/v1", "scripted-guard")
    try:
        with pytest.raises(GuardEngineError, match="unpaired surrogate"):
            await engine.complete("judge this: \ud800", Sampling())
    finally:
        await engine.aclose()
