"""The proxy's own CPU per request, measured from the outside (issue 11's figure).

A fake upstream and a scripted guard, both answering at once, each its own process on loopback; RSafe Proxy
(`rsafe-proxy serve`, one process) in front of them. Closed-loop load of non-streamed requests; the CPU time
(utime + stime from /proc/<pid>/stat) of each process before and after, divided by the requests:

- screened: POST /v1/chat/completions through the proxy (an input verdict, the upstream call, an output verdict);
- pass-through: POST /v1/embeddings through the proxy (forwarded unscreened);
- direct upstream: the fake upstream's own CPU per chat completion, the reference for "one small HTTP server".

CPU per request is the figure that stays steady on a busy machine; wall-clock figures are printed but noisy.

    python benchmarks/proxy_cpu.py [--requests 400] [--concurrency 1 16] [--rounds 3] [--profile proxy.prof]

`--profile FILE` runs the proxy under cProfile and writes its statistics to FILE when it stops (read them with
`python -m pstats FILE`); the CPU figures of that run include the profiler's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from proxy_overhead import free_port, process, proxy_env  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
CHAT = "/v1/chat/completions"
# The proxy's CLI under cProfile. uvicorn re-raises the SIGTERM it caught once it has shut down; a Python handler
# turns that into SystemExit, so that the profile is written instead of the process dying by the signal.
PROFILED = """
import cProfile, signal, sys
from rsafe_proxy.cli import main
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
out, sys.argv = sys.argv[1], ["rsafe-proxy", *sys.argv[2:]]
profile = cProfile.Profile()
try:
    profile.runcall(main)
except SystemExit:
    pass
finally:
    profile.dump_stats(out)
"""
EMBEDDINGS = "/v1/embeddings"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has spent so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def payload(path: str, number: int) -> dict[str, object]:
    """A unique request body for `path` (unique so that no verdict comes from the proxy's cache)."""
    if path == EMBEDDINGS:
        return {"model": "fake-embedding", "input": f"Line {number} about the sea."}
    return {"model": "fake-model", "messages": [{"role": "user", "content": f"Line {number} about the sea."}]}


async def load(base: str, path: str, requests: int, concurrency: int, offset: int) -> float:
    """Send `requests` POSTs to `path`, `concurrency` at a time (closed loop); returns the wall time."""
    queue = iter(range(offset, offset + requests))
    headers = {"authorization": "Bearer sk-bench"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for number in queue:
                response = await client.post(path, json=payload(path, number), headers=headers)
                response.raise_for_status()

        await asyncio.gather(*(worker() for _ in range(concurrency)))  # opens the connections
        started = time.perf_counter()
        queue = iter(range(offset + requests, offset + 2 * requests))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


@dataclass
class Cell:
    """One kind of request at one concurrency against one proxy: CPU ms per request of each process (the least of
    the rounds: other work on a busy machine only ever adds to a process's CPU) and the median throughput."""

    proxy: str
    request: str
    concurrency: int
    proxy_cpu_ms: float
    upstream_cpu_ms: float
    guard_cpu_ms: float
    rps: float

    def row(self) -> str:
        figures = f"{self.proxy_cpu_ms:.2f} | {self.upstream_cpu_ms:.2f} | {self.guard_cpu_ms:.2f} | {self.rps:.0f}"
        return f"| {self.proxy} | {self.request} | {self.concurrency} | {figures} |"


HEADER = (
    "| proxy | request | concurrency | proxy CPU ms / req | upstream CPU ms / req | guard CPU ms / req | req/s |\n"
    "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
)
KINDS = [("direct upstream (chat)", "upstream", CHAT), ("screened (chat)", "proxy", CHAT)]
KINDS.append(("pass-through (embeddings)", "proxy", EMBEDDINGS))


@contextmanager
def servers(work: str, profile: str | None, source: str | None = None) -> Iterator[dict[str, tuple[int, int]]]:
    """The doubles and the proxy: {name: (port, pid)}; the proxy's package from `source` when given."""
    python = sys.executable
    up, guard, proxy = free_port(), free_port(), free_port()
    env = proxy_env(up, guard, work, "sk-bench")
    env["RSAFE_STATE_DIR"] = os.path.join(work, "state")
    if source:  # ahead of the editable install's finder, which comes last
        env["PYTHONPATH"] = os.path.abspath(source)
    exe = shutil.which("rsafe-proxy", path=os.path.dirname(python)) or "rsafe-proxy"
    serve = [exe] if profile is None else [python, "-c", PROFILED, os.path.abspath(profile)]
    doubles = str(HERE / "doubles_server.py")
    with ExitStack() as stack:
        started = {
            "upstream": (
                up,
                stack.enter_context(
                    process([python, doubles, "upstream", str(up), "0"], f"http://127.0.0.1:{up}/v1/models")
                ).pid,
            ),
            "guard": (
                guard,
                stack.enter_context(
                    process([python, doubles, "guard", str(guard), "0"], f"http://127.0.0.1:{guard}/v1/models")
                ).pid,
            ),
        }
        command = [*serve, "serve", "--port", str(proxy), "--log-level", "warning"]
        started["proxy"] = (
            proxy,
            stack.enter_context(process(command, f"http://127.0.0.1:{proxy}/healthz", env, work)).pid,
        )
        yield started


def measure(
    requests: int,
    concurrencies: list[int],
    rounds: int,
    profile: str | None = None,
    sources: list[str | None] | None = None,
) -> list[Cell]:
    """Every kind of request at every concurrency, `rounds` times each, against the proxy of each of `sources`
    (None: this checkout), each with doubles of its own. The proxies take turns within each round, so that what
    else the machine runs meanwhile weighs on them alike."""
    sources = sources or [None]
    work = tempfile.mkdtemp(prefix="rsafe-cpu-")
    spent: dict[tuple[int, str, int, str], list[float]] = {}
    rates: dict[tuple[int, str, int], list[float]] = {}
    try:
        with ExitStack() as stack:
            setups = []
            for number, source in enumerate(sources):
                directory = os.path.join(work, str(number))
                os.makedirs(directory)
                setups.append(stack.enter_context(servers(directory, profile, source)))
            offset = 0
            for _ in range(rounds):
                for concurrency in concurrencies:
                    for name, target, path in KINDS:
                        for number, running in enumerate(setups):
                            pids = {key: pid for key, (_, pid) in running.items()}
                            before = {key: cpu_seconds(pid) for key, pid in pids.items()}
                            base = f"http://127.0.0.1:{running[target][0]}"
                            wall = asyncio.run(load(base, path, requests, concurrency, offset))
                            offset += 2 * requests
                            for key, pid in pids.items():
                                # the warm-up half is not timed but is spent: count both halves
                                per_request = (cpu_seconds(pid) - before[key]) * 1000 / (2 * requests)
                                spent.setdefault((number, name, concurrency, key), []).append(per_request)
                            rates.setdefault((number, name, concurrency), []).append(requests / wall)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        Cell(
            source or "this checkout",
            name,
            concurrency,
            min(spent[(number, name, concurrency, "proxy")]),
            min(spent[(number, name, concurrency, "upstream")]),
            min(spent[(number, name, concurrency, "guard")]),
            statistics.median(rates[(number, name, concurrency)]),
        )
        for number, source in enumerate(sources)
        for concurrency in concurrencies
        for name, _, _ in KINDS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="timed requests per round (as many warm first)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per cell; the least CPU is reported")
    parser.add_argument(
        "--source",
        nargs="+",
        help="directories holding another rsafe_proxy package each, measured instead, turn about ('.': this one)",
    )
    parser.add_argument("--profile", help="run the proxy under cProfile, statistics to this file")
    parser.add_argument("--json", help="also write the cells to this JSON file")
    args = parser.parse_args()
    sources: list[str | None] = [None if source == "." else source for source in args.source or ["."]]
    cells = measure(args.requests, args.concurrency, args.rounds, args.profile, sources)
    print(f"{args.requests} requests per round (after as many to warm up), least CPU of {args.rounds} rounds\n")
    print(HEADER)
    for cell in cells:
        print(cell.row())
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(cell) for cell in cells], indent=2) + "\n")


if __name__ == "__main__":
    main()
