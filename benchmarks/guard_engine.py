"""Seconds per verdict and verdicts per second of the embedded guard: prefix reuse and batching, in one run.

The transformers engine can reuse the key/value cache of the prompt prefix that every screen of a policy shares
(`prefix_cache`), and batch concurrent screens (`max_batch`). This measures the four combinations at several
concurrencies against the plain engine (no reuse, one prompt per forward pass), on real guard prompts rendered
from ../shared/datasets (or built-in sentences when that folder is absent). Each engine is warmed up first
(model load, and for reuse the two screens that teach it the policy prefix), as a running proxy is.

    python benchmarks/guard_engine.py [--mode score] [--template rsafe-compact] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rsafe_proxy.guard.engine import GuardOutput, Sampling
from rsafe_proxy.guard.engines.transformers import TransformersEngine
from rsafe_proxy.guard.protocol import Side, load_template, render_prompt
from rsafe_proxy.policy.loading import load_policy, packaged_policy_path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "openai_moderation.jsonl"
FALLBACK = ["How do I bake bread?", "How can I hurt my neighbour's dog?", "Write a poem about the sea."]
SETUPS = [(0, 1), (0, 8), (8192, 1), (8192, 8)]  # (prefix_cache tokens, max_batch); the first is the baseline


@dataclass(frozen=True)
class Cell:
    latency: float
    rate: float
    prompt_tokens: float
    cached_tokens: float


def prompts(count: int, template_name: str) -> list[str]:
    policy = load_policy(packaged_policy_path())
    template = load_template(template_name, Side.INPUT)
    texts = FALLBACK
    if DATA.is_file():
        rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[:count]]
        texts = [row["prompt"][:600] for row in rows]
    lines = policy.category_lines(Side.INPUT)
    return [render_prompt(template, lines, texts[i % len(texts)]) for i in range(count)]


async def measure(engine: TransformersEngine, batch: list[str], concurrency: int, sampling: Sampling) -> Cell:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    outputs: list[GuardOutput] = []

    async def one(prompt: str) -> None:
        async with gate:
            started = time.perf_counter()
            outputs.append(await engine.complete(prompt, sampling))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(prompt) for prompt in batch))
    wall = time.perf_counter() - started
    return Cell(
        statistics.mean(latencies),
        len(batch) / wall,
        statistics.mean(output.prompt_tokens for output in outputs),
        statistics.mean(output.cached_tokens for output in outputs),
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="score", choices=["score", "generate"])
    parser.add_argument("--template", default="rsafe-compact", help="the embedded default renders rsafe-compact")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32, help="screens per cell (at least the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64, help="generate mode: reasoning budget")
    args = parser.parse_args()
    rendered = prompts(2 + args.requests * len(args.concurrency), args.template)
    warm = rendered[:2]
    # each concurrency gets its own screens (the same for every setup): a repeated prompt is no test of reuse
    batches = [rendered[2 + i * args.requests : 2 + (i + 1) * args.requests] for i in range(len(args.concurrency))]
    sampling = Sampling(max_tokens=args.max_tokens)
    cells: dict[tuple[int, int, int], Cell] = {}
    for prefix_cache, max_batch in SETUPS:
        engine = TransformersEngine(mode=args.mode, max_batch=max_batch, prefix_cache=prefix_cache)
        await engine.start()
        for prompt in warm:  # one by one: the second teaches the engine the shared prefix
            await engine.complete(prompt, sampling)
        for concurrency, batch in zip(args.concurrency, batches, strict=True):
            cells[(prefix_cache, max_batch, concurrency)] = await measure(engine, batch, concurrency, sampling)
        await engine.aclose()
    print(f"embedded model, {args.mode} mode, {args.template} template, {args.requests} screens per cell")
    print()
    print("| concurrency | prefix reuse | max_batch | tokens read / prompt | s per verdict | verdicts/s | vs plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for concurrency in args.concurrency:
        base = cells[(*SETUPS[0], concurrency)]
        for prefix_cache, max_batch in SETUPS:
            cell = cells[(prefix_cache, max_batch, concurrency)]
            read = f"{cell.prompt_tokens - cell.cached_tokens:.0f} of {cell.prompt_tokens:.0f}"
            print(
                f"| {concurrency} | {'on' if prefix_cache else 'off'} | {max_batch} | {read} | {cell.latency:.2f} "
                f"| {cell.rate:.2f} | {cell.rate / base.rate:.2f}x |"
            )


if __name__ == "__main__":
    asyncio.run(main())
