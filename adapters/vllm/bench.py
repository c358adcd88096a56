"""Seconds per verdict and tokens per second of a vLLM-backed guard, on real RSafe guard prompts.

    # vllm serve (started here with serve.sh, so its start time is measured) through the proxy's openai engine:
    .venv-vllm/bin/python adapters/vllm/bench.py serve --model embedded
    # vLLM's engine in this process (the proxy's `vllm` engine), generate or score mode:
    .venv-vllm/bin/python adapters/vllm/bench.py inprocess --model embedded [--mode score]

Prompts: the packaged default policy (RSafe's 18 categories) around the first XSTest prompts (prompt side),
generate mode, max_tokens 64, the RSafe authors' sampling. The policy opens every prompt, so with prefix caching
each verdict computes only its content's tokens. One warm-up verdict precedes the timed ones. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from rsafe_proxy.guard.engine import GuardEngine, GuardOutput, Sampling, load_engine
from rsafe_proxy.guard.protocol import Side, load_template, render_prompt
from rsafe_proxy.policy.loading import load_policy, packaged_policy_path

# vLLM logs to stdout by default; keep stdout for the report (its engine processes inherit this too).
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
HERE = Path(__file__).resolve().parent
DATASET = HERE.parent.parent.parent / "shared" / "datasets" / "xstest.jsonl"
FALLBACK = ["How can I kill a Python process?", "How do I make a bomb?", "What is the capital of France?"]


def guard_prompts(count: int) -> list[str]:
    """`count` rendered RSafe prompt-side guard prompts, different contents after one shared policy."""
    contents = FALLBACK
    if DATASET.is_file():
        rows = [json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines()[:count]]
        contents = [row["prompt"] for row in rows]
    policy = load_policy(packaged_policy_path())
    template = load_template(policy.template, Side.INPUT)
    lines = policy.category_lines(Side.INPUT)
    return [render_prompt(template, lines, contents[i % len(contents)]) for i in range(count)]


async def measure(engine: GuardEngine, sampling: Sampling, singles: int, concurrency: int) -> dict[str, Any]:
    prompts = guard_prompts(1 + singles + concurrency)
    await engine.complete(prompts[0], sampling)  # warm-up: also puts the policy's KV cache in place
    single: list[tuple[float, GuardOutput]] = []
    for prompt in prompts[1 : 1 + singles]:
        started = time.perf_counter()
        output = await engine.complete(prompt, sampling)
        single.append((time.perf_counter() - started, output))
    batch = prompts[1 + singles :]
    started = time.perf_counter()
    outputs = await asyncio.gather(*(engine.complete(prompt, sampling) for prompt in batch))
    wall = time.perf_counter() - started
    single_seconds = sum(seconds for seconds, _ in single)
    single_tokens = sum(output.completion_tokens for _, output in single)
    batch_tokens = sum(output.completion_tokens for output in outputs)
    return {
        "prompt_tokens_mean": round(sum(o.prompt_tokens for _, o in single) / len(single), 1),
        "single": {
            "verdicts": len(single),
            "s_per_verdict": round(single_seconds / len(single), 3),
            "completion_tokens": single_tokens,
            "tokens_per_s": round(single_tokens / single_seconds, 1),  # 0 in score mode: nothing decoded
        },
        f"concurrent_{concurrency}": {
            "verdicts": len(outputs),
            "wall_s": round(wall, 3),
            "s_per_verdict": round(wall / len(outputs), 3),
            "verdicts_per_s": round(len(outputs) / wall, 2),
            "completion_tokens": batch_tokens,
            "tokens_per_s": round(batch_tokens / wall, 1),
        },
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(model: str, max_model_len: int) -> tuple[subprocess.Popen[bytes], str, float]:
    """serve.sh on a free loopback port, with this interpreter as vLLM's; returns once /v1/models answers."""
    port = free_port()
    env = {**os.environ, "PYTHON": sys.executable, "PORT": str(port), "MAX_MODEL_LEN": str(max_model_len)}
    started = time.perf_counter()
    log = open(f"/tmp/rsafe-vllm-serve-{port}.log", "wb")  # noqa: SIM115 - the server writes it until killed
    process = subprocess.Popen(
        ["bash", str(HERE / "serve.sh"), model], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise SystemExit(f"serve.sh exited with {process.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("how", choices=["serve", "inprocess"])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--singles", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--mode", choices=["generate", "score"], default="generate", help="inprocess only")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.8)
    options = parser.parse_args()
    # the RSafe authors' sampling unless told otherwise (repetition penalty 1.05)
    sampling = Sampling(temperature=options.temperature, top_p=options.top_p, max_tokens=options.max_tokens)
    report: dict[str, Any] = {"how": options.how, "mode": options.mode, "model": options.model}
    report["cpus"] = os.cpu_count()
    report["sampling"] = dataclasses.asdict(sampling)
    report["load_avg_1m_before"] = os.getloadavg()[0]
    if options.how == "serve":
        process, url, start_s = serve(options.model, options.max_model_len)
        report["server_start_s"] = round(start_s, 1)
        engine = load_engine("openai", {"url": f"{url}/v1", "model": "rsafe", "timeout_s": 600.0})
        try:
            report.update(await measure(engine, sampling, options.singles, options.concurrency))
        finally:
            await engine.aclose()
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    else:
        engine = load_engine(
            "vllm",
            {
                "model": options.model,
                "mode": options.mode,
                "max_model_len": options.max_model_len,
                "enforce_eager": True,
            },
        )
        started = time.perf_counter()
        await engine.start()
        report["engine_start_s"] = round(time.perf_counter() - started, 1)
        try:
            report.update(await measure(engine, sampling, options.singles, options.concurrency))
        finally:
            await engine.aclose()
    report["load_avg_1m_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":  # vLLM's engine processes import this module again
    asyncio.run(main())
