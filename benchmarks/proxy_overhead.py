"""What the proxy adds to a request, against what a user would otherwise run, in one run.

Each server is its own process on loopback: a fake upstream (first byte after UPSTREAM_DELAY_S), a scripted
guard (GUARD_DELAY_S per verdict), RSafe Proxy (`rsafe-proxy serve`, guard = the scripted one), and, when a
LiteLLM venv is given, LiteLLM's proxy in front of the same upstream, once with no guardrail and once with RSafe
Proxy as its guardrail (LiteLLM's generic_guardrail_api: prompt before the upstream, answer after). The client sends
non-streamed chat completions at several concurrencies and reports latency and throughput, and the ratios
to the direct upstream.

    python benchmarks/proxy_overhead.py [--requests 200] [--concurrency 1 16 64] [--litellm .venv-litellm/bin/litellm]

CPU ms / request is what the target's own processes spent (user + system, from /proc, before and after).
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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
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
    command: list[str], ready_url: str, env: dict[str, str] | None = None, cwd: str | None = None, timeout: float = 120
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` running, once `ready_url` answers (within `timeout` s); stopped (killed if it must) after."""
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(ready_url, timeout)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def load(url: str, requests: int, concurrency: int, headers: dict[str, str]) -> tuple[list[float], float]:
    """Latencies of `requests` chat completions sent `concurrency` at a time, and the wall time."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Write one line about the sea."}]}
    # aiohttp: the load generator shares the cores with what it measures, so it should cost little (httpx cost
    # more CPU per request than the proxy itself after the proxy moved to aiohttp: see benchmarks/README.md)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:

        async def one(number: int) -> None:
            async with gate:
                started = time.perf_counter()
                payload = {**body, "messages": [{"role": "user", "content": f"Line {number} about the sea."}]}
                async with client.post(url, json=payload, headers=headers) as response:
                    await response.read()
                    response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        await one(-1)  # warm the connection pools
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one(number) for number in range(requests)))
        return latencies, time.perf_counter() - started


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of these processes and their descendants (from /proc)."""
    from workers import cpu_seconds as of_tree

    return sum(of_tree(pid) for pid in pids)


@dataclass
class Cell:
    """One target at one concurrency: latencies, throughput, and the CPU its own processes spent per request."""

    target: str
    concurrency: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: float
    cpu_ms_per_request: float
    latencies_ms: list[float] = field(repr=False)

    def row(self, base: Cell | None) -> str:
        ratio = f"{self.p50_ms / base.p50_ms:.2f}x / {self.rps / base.rps:.2f}x" if base else "1.00x / 1.00x"
        figures = f"{self.p50_ms:.1f} | {self.p95_ms:.1f} | {self.p99_ms:.1f} | {self.rps:.1f}"
        return f"| {self.target} | {figures} | {self.cpu_ms_per_request:.2f} | {ratio} |"


HEADER = (
    "| target | p50 ms | p95 ms | p99 ms | req/s | CPU ms / request | p50 / rps ratio |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
)


def measure_all(requests: int, concurrencies: list[int], litellm_exe: str | None) -> list[Cell]:
    """Every target at every concurrency, in one run against the same doubles. CPU is what the target's own
    processes spent: the fake upstream for the direct upstream, the proxy for RSafe Proxy, LiteLLM's proxy, and
    LiteLLM's plus RSafe Proxy's for LiteLLM with RSafe as its guardrail."""
    from workers import percentile

    work = tempfile.mkdtemp(prefix="rsafe-bench-")
    up, guard, proxy, lite, guarded = free_port(), free_port(), free_port(), free_port(), free_port()
    python = sys.executable
    env = proxy_env(up, guard, work, "sk-bench")
    env["RSAFE_STATE_DIR"] = os.path.join(work, "state")
    exe = shutil.which("rsafe-proxy", path=os.path.dirname(python)) or "rsafe-proxy"
    cells: list[Cell] = []
    with (
        process(
            [python, str(HERE / "doubles_server.py"), "upstream", str(up), str(UPSTREAM_DELAY_S)],
            f"http://127.0.0.1:{up}/v1/models",
        ) as upstream_process,
        process(
            [python, str(HERE / "doubles_server.py"), "guard", str(guard), str(GUARD_DELAY_S)],
            f"http://127.0.0.1:{guard}/v1/models",
        ),
        process(
            [exe, "serve", "--port", str(proxy), "--log-level", "warning"],
            f"http://127.0.0.1:{proxy}/healthz",
            env,
            work,
        ) as proxy_process,
        litellm(litellm_exe, lite, up, work) as lite_pid,
        litellm(litellm_exe, guarded, up, work, guardrail=f"http://127.0.0.1:{proxy}") as guarded_pid,
    ):
        targets = [("direct upstream", up, [upstream_process.pid])]
        if lite_pid is not None:
            targets.append(("LiteLLM proxy (no guard)", lite, [lite_pid]))
        targets.append(("RSafe Proxy (in+out screens)", proxy, [proxy_process.pid]))
        if guarded_pid is not None:
            targets.append(("LiteLLM + RSafe guardrail", guarded, [guarded_pid, proxy_process.pid]))
        for concurrency in concurrencies:
            for name, port, pids in targets:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                before = cpu_seconds(pids)
                latencies, wall = asyncio.run(load(url, requests, concurrency, {"authorization": "Bearer sk-bench"}))
                spent = cpu_seconds(pids) - before
                ms = [value * 1000 for value in latencies]
                cells.append(
                    Cell(
                        name,
                        concurrency,
                        statistics.median(ms),
                        percentile(ms, 0.95),
                        percentile(ms, 0.99),
                        len(ms) / wall,
                        spent * 1000 / len(ms),
                        ms,
                    )
                )
    shutil.rmtree(work, ignore_errors=True)
    return cells


def print_cells(cells: list[Cell]) -> None:
    for concurrency in sorted({cell.concurrency for cell in cells}):
        print(f"\nconcurrency {concurrency}\n")
        print(HEADER)
        row = [cell for cell in cells if cell.concurrency == concurrency]
        for cell in row:
            print(cell.row(row[0] if cell is not row[0] else None))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--litellm", help="path to a `litellm` executable (a venv with litellm[proxy])")
    args = parser.parse_args()
    print(
        f"upstream first byte {UPSTREAM_DELAY_S * 1000:.0f} ms, guard {GUARD_DELAY_S * 1000:.0f} ms per verdict, "
        f"{args.requests} requests per cell; ratios are latency p50 / throughput against the direct upstream"
    )
    print_cells(measure_all(args.requests, args.concurrency, args.litellm))


@contextmanager
def litellm(
    executable: str | None, port: int, upstream: int, work: str, guardrail: str | None = None
) -> Iterator[int | None]:
    """LiteLLM's proxy on `port` (its pid), or nothing when no executable is given."""
    if not executable:
        yield None
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
    with process(command, f"http://127.0.0.1:{port}/health/liveliness", env, work) as proc:
        yield proc.pid


if __name__ == "__main__":
    main()
