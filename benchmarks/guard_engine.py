"""Seconds per verdict and verdicts per second of the embedded guard at several concurrencies.

The transformers engine batches concurrent screens (up to `max_batch` per forward pass); this measures what
that buys against one-at-a-time (`max_batch=1`), in one run, on real RSafe prompts rendered from
../shared/datasets (or built-in sentences when that folder is absent).

    python benchmarks/guard_engine.py [--mode score] [--concurrency 1 8 32] [--requests 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from rsafe_proxy.guard.engine import Sampling
from rsafe_proxy.guard.engines.transformers import TransformersEngine
from rsafe_proxy.guard.protocol import Side, load_template, render_prompt
from rsafe_proxy.policy.loading import load_policy, packaged_policy_path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "openai_moderation.jsonl"
FALLBACK = ["How do I bake bread?", "How can I hurt my neighbour's dog?", "Write a poem about the sea."]


def prompts(count: int) -> list[str]:
    policy = load_policy(packaged_policy_path())
    template = load_template("rsafe", Side.INPUT)
    texts = FALLBACK
    if DATA.is_file():
        rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[: count * 2]]
        texts = [row["prompt"][:600] for row in rows]
    return [render_prompt(template, policy.category_lines(Side.INPUT), texts[i % len(texts)]) for i in range(count)]


async def measure(engine: TransformersEngine, batch: list[str], concurrency: int) -> tuple[float, float]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(prompt: str) -> None:
        async with gate:
            started = time.perf_counter()
            await engine.complete(prompt, Sampling(max_tokens=64))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(prompt) for prompt in batch))
    wall = time.perf_counter() - started
    return statistics.mean(latencies), len(batch) / wall


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="score", choices=["score", "generate"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args()
    batch = prompts(args.requests)
    print(f"embedded model, {args.mode} mode, {args.requests} RSafe prompt screens per cell")
    print("| max_batch | concurrency | s per verdict (mean latency) | verdicts/s | speed-up vs max_batch 1 |")
    print("| --- | --- | --- | --- | --- |")
    for concurrency in args.concurrency:
        baseline = None
        for max_batch in (1, 8):
            engine = TransformersEngine(mode=args.mode, max_batch=max_batch)
            await engine.start()
            await engine.complete(batch[0], Sampling(max_tokens=8))  # warm
            latency, rate = await measure(engine, batch, concurrency)
            await engine.aclose()
            baseline = baseline or rate
            print(f"| {max_batch} | {concurrency} | {latency:.2f} | {rate:.2f} | {rate / baseline:.2f}x |")


if __name__ == "__main__":
    asyncio.run(main())
