"""What the proxy adds to a request, against what a user would otherwise run, in one run.

Each server is its own process on loopback: a fake upstream (first byte after UPSTREAM_DELAY_S), a scripted
guard (GUARD_DELAY_S per verdict), RSafe Proxy (`rsafe-proxy serve`, guard = the scripted one), and, when a
LiteLLM venv is given, LiteLLM's proxy in front of the same upstream, once with no guardrail and once with RSafe
Proxy as its guardrail (LiteLLM's generic_guardrail_api: prompt before the upstream, answer after). The client sends
non-streamed chat completions at several concurrencies and reports latency and throughput, and the ratios
to the direct upstream.

    python benchmarks/proxy_overhead.py [--requests 200] [--litellm .venv-litellm/bin/litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
UPSTREAM_DELAY_S = 0.05
GUARD_DELAY_S = 0.02


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def proxy_env(upstream_port: int, guard_port: int, work: str, upstream_key: str) -> dict[str, str]:
    """The environment of `rsafe-proxy serve` in front of the doubles on these ports (spans into `work`)."""
    return {
        **os.environ,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "OPENAI_API_KEY": upstream_key,
        "RSAFE_GUARD_URL": f"http://127.0.0.1:{guard_port}/v1",
        "RSAFE_GUARD_MODEL": "scripted-guard",
        "RSAFE_SPANS_FILE": os.path.join(work, "spans.jsonl"),
    }


@contextmanager
def process(
    command: list[str], ready_url: str, env: dict[str, str] | None = None, cwd: str | None = None
) -> Iterator[None]:
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(ready_url)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


async def load(url: str, requests: int, concurrency: int, headers: dict[str, str]) -> tuple[list[float], float]:
    """Latencies of `requests` chat completions sent `concurrency` at a time, and the wall time."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Write one line about the sea."}]}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(number: int) -> None:
            async with gate:
                started = time.perf_counter()
                payload = {**body, "messages": [{"role": "user", "content": f"Line {number} about the sea."}]}
                response = await client.post(url, json=payload, headers=headers)
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        await one(-1)  # warm the connection pools
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one(number) for number in range(requests)))
        return latencies, time.perf_counter() - started


def row(name: str, latencies: list[float], wall: float, base: tuple[float, float] | None) -> str:
    p50 = statistics.median(latencies) * 1000
    p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))] * 1000
    rps = len(latencies) / wall
    ratio = f"{p50 / base[0]:.2f}x / {rps / base[1]:.2f}x" if base else "1.00x / 1.00x"
    return f"| {name:<28} | {p50:8.1f} | {p95:8.1f} | {rps:7.1f} | {ratio:>15} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--litellm", help="path to a `litellm` executable (a venv with litellm[proxy])")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="rsafe-bench-")
    up, guard, proxy, lite, guarded = free_port(), free_port(), free_port(), free_port(), free_port()
    python = sys.executable
    env = proxy_env(up, guard, work, "sk-bench")
    exe = shutil.which("rsafe-proxy", path=os.path.dirname(python)) or "rsafe-proxy"
    targets = [("direct upstream", f"http://127.0.0.1:{up}/v1/chat/completions")]
    with (
        process(
            [python, str(HERE / "doubles_server.py"), "upstream", str(up), str(UPSTREAM_DELAY_S)],
            f"http://127.0.0.1:{up}/v1/models",
        ),
        process(
            [python, str(HERE / "doubles_server.py"), "guard", str(guard), str(GUARD_DELAY_S)],
            f"http://127.0.0.1:{guard}/v1/models",
        ),
        process(
            [exe, "serve", "--port", str(proxy), "--log-level", "warning"],
            f"http://127.0.0.1:{proxy}/healthz",
            env,
            work,
        ),
        litellm(args.litellm, lite, up, work),
        litellm(args.litellm, guarded, up, work, guardrail=f"http://127.0.0.1:{proxy}"),
    ):
        targets.append(("RSafe Proxy (in+out screens)", f"http://127.0.0.1:{proxy}/v1/chat/completions"))
        if args.litellm:
            targets.insert(1, ("LiteLLM proxy (no guard)", f"http://127.0.0.1:{lite}/v1/chat/completions"))
            targets.append(("LiteLLM + RSafe guardrail", f"http://127.0.0.1:{guarded}/v1/chat/completions"))
        print(
            f"upstream first byte {UPSTREAM_DELAY_S * 1000:.0f} ms, guard {GUARD_DELAY_S * 1000:.0f} ms per verdict, "
            f"{args.requests} requests per cell; ratios are latency p50 / throughput against the direct upstream"
        )
        for concurrency in args.concurrency:
            print(f"\nconcurrency {concurrency}\n")
            print("| target                       | p50 ms   | p95 ms   | req/s   | p50 / rps ratio |")
            print("| ---------------------------- | -------- | -------- | ------- | --------------- |")
            base = None
            for name, url in targets:
                headers = {"authorization": "Bearer sk-bench"}
                latencies, wall = asyncio.run(load(url, args.requests, concurrency, headers))
                print(row(name, latencies, wall, base))
                base = base or (statistics.median(latencies) * 1000, len(latencies) / wall)


@contextmanager
def litellm(
    executable: str | None, port: int, upstream: int, work: str, guardrail: str | None = None
) -> Iterator[None]:
    if not executable:
        yield
        return
    config = Path(work) / f"litellm-{port}.yaml"
    text = (
        "model_list:\n  - model_name: fake-model\n    litellm_params:\n      model: openai/fake-model\n"
        f"      api_base: http://127.0.0.1:{upstream}/v1\n      api_key: sk-bench\n"
    )
    if guardrail:
        text += (
            "guardrails:\n  - guardrail_name: rsafe\n    litellm_params:\n      guardrail: generic_guardrail_api\n"
            f"      mode: [pre_call, post_call]\n      default_on: true\n      api_base: {guardrail}\n"
        )
    config.write_text(text)
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_MASTER_KEY="sk-bench")
    command = [os.path.abspath(executable), "--config", str(config), "--port", str(port), "--num_workers", "1"]
    with process(command, f"http://127.0.0.1:{port}/health/liveliness", env, work):
        yield


if __name__ == "__main__":
    main()
