"""Requests per second of RSafe Proxy at 1 and 2 worker processes (`rsafe-proxy serve --workers N`).

Every server is its own process on loopback: a fake upstream and a scripted guard, both answering at once (no
delay: what is measured is the proxy's own work), and RSafe Proxy in front of them. A closed-loop client sends
non-streamed chat completions, `--concurrency` at a time, each with its own prompt (no cached verdict): two
guard calls and one upstream call per request. The proxy's CPU time (parent and workers, from /proc) and the
client's own are read before and after, so that a client starving the proxy of cores shows.

`--embedded-rss` also starts the proxy with the embedded guard model (the default configuration) and reports the
resident memory of one worker once the model is loaded: what each further worker costs.

    python benchmarks/workers.py [--requests 2000] [--concurrency 32] [--workers 1 2] [--embedded-rss]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from proxy_overhead import free_port, load, process, proxy_env  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (the workers and their helpers)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            queue.extend(int(child) for child in task.read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants so far (what has exited is not counted)."""
    total = 0
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def rss_mib(pid: int) -> float:
    """The resident memory of one process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Doubles:
    """The fake upstream and the scripted guard: their ports and pids."""

    upstream: int
    guard: int
    pids: tuple[int, int]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)


@contextmanager
def doubles(work: str) -> Iterator[Doubles]:
    """The fake upstream and the scripted guard, each its own process, answering at once."""
    python, up, guard = sys.executable, free_port(), free_port()
    script = str(HERE / "doubles_server.py")
    with (
        process([python, script, "upstream", str(up), "0"], f"http://127.0.0.1:{up}/v1/models", cwd=work) as one,
        process([python, script, "guard", str(guard), "0"], f"http://127.0.0.1:{guard}/v1/models", cwd=work) as two,
    ):
        yield Doubles(up, guard, (one.pid, two.pid))


def rsafe_proxy() -> str:
    return shutil.which("rsafe-proxy", path=os.path.dirname(sys.executable)) or "rsafe-proxy"


@dataclass
class Cell:
    """One measurement: a worker count at one concurrency."""

    workers: int
    concurrency: int
    requests: int
    wall_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_ms_per_request: float
    client_cpu_ms_per_request: float
    doubles_cpu_ms_per_request: float
    latencies_ms: list[float] = field(repr=False)

    def row(self, base: float | None) -> str:
        ratio = f"{self.rps / base:.2f}x" if base else "1.00x"
        return (
            f"| {self.workers} | {self.concurrency} | {self.rps:.1f} | {ratio} | {self.p50_ms:.1f} | {self.p99_ms:.1f} "
            f"| {self.proxy_cpu_ms_per_request:.2f} | {self.client_cpu_ms_per_request:.2f} "
            f"| {self.doubles_cpu_ms_per_request:.2f} |"
        )


HEADER = (
    "| workers | concurrency | req/s | vs 1 worker | p50 ms | p99 ms | proxy CPU ms / request "
    "| client CPU ms / request | doubles CPU ms / request |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure(workers: int, requests: int, concurrency: int, doubled: Doubles, work: str) -> Cell:
    """`rsafe-proxy serve --workers N` in front of the doubles, loaded closed-loop."""
    port = free_port()
    env = proxy_env(doubled.upstream, doubled.guard, work, "sk-bench")
    env["RSAFE_STATE_DIR"] = os.path.join(work, f"state-{workers}")
    command = [rsafe_proxy(), "serve", "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with process(command, f"http://127.0.0.1:{port}/readyz", env, work) as proxy:
        headers = {"authorization": "Bearer sk-bench"}
        asyncio.run(load(url, max(concurrency * 4, 50), concurrency, headers))  # every worker warm
        cpu, own, theirs = cpu_seconds(proxy.pid), own_cpu_seconds(), doubled.cpu_seconds()
        latencies, wall = asyncio.run(load(url, requests, concurrency, headers))
        cpu, own = cpu_seconds(proxy.pid) - cpu, own_cpu_seconds() - own
        theirs = doubled.cpu_seconds() - theirs
    return Cell(
        workers,
        concurrency,
        requests,
        wall,
        requests / wall,
        statistics.median(latencies) * 1000,
        percentile(latencies, 0.99) * 1000,
        cpu * 1000 / requests,
        own * 1000 / requests,
        theirs * 1000 / requests,
        [latency * 1000 for latency in latencies],
    )


def run(requests: int, concurrency: int, counts: list[int]) -> list[Cell]:
    """Every worker count in `counts` against the same doubles."""
    work = tempfile.mkdtemp(prefix="rsafe-workers-bench-")
    try:
        with doubles(work) as doubled:
            return [measure(count, requests, concurrency, doubled, work) for count in counts]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def embedded_rss(workers: int = 1) -> dict[str, Any]:
    """Resident memory of each worker of a proxy with the embedded guard, once the model is loaded (/readyz)."""
    work = tempfile.mkdtemp(prefix="rsafe-rss-bench-")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RSAFE_GUARD", "OPENAI_"))}
    env.update(RSAFE_STATE_DIR=os.path.join(work, "state"), RSAFE_SPANS_FILE=os.path.join(work, "spans.jsonl"))
    command = [rsafe_proxy(), "serve", "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    started_at = time.monotonic()
    try:
        with process(command, f"http://127.0.0.1:{port}/readyz", env, work, timeout=600) as proxy:
            ready_s = time.monotonic() - started_at
            # with one worker the parent serves; with several, its spawned children do (not its resource tracker)
            children = [
                pid for pid in tree(proxy.pid)[1:] if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            parent = rss_mib(proxy.pid)
            served = [rss_mib(pid) for pid in children] or [parent]
            return {
                "workers": workers,
                "ready_s": round(ready_s, 1),
                "parent_rss_mib": round(parent, 1),
                "worker_rss_mib": [round(mib, 1) for mib in served],
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_cells(cells: list[Cell]) -> None:
    print(HEADER)
    base = None
    for cell in cells:
        print(cell.row(base))
        base = base or cell.rps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per cell (after a warm-up)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (closed loop)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    parser.add_argument("--embedded-rss", action="store_true", help="also measure a worker's memory, embedded model")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.requests} requests at concurrency {args.concurrency}; doubles answer at once")
    cells = run(args.requests, args.concurrency, args.workers)
    print_cells(cells)
    if args.embedded_rss:
        memory = embedded_rss()
        print(f"\nembedded guard: ready in {memory['ready_s']} s; one worker's RSS {memory['worker_rss_mib'][0]} MiB")


if __name__ == "__main__":
    main()
