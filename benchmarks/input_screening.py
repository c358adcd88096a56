"""Parallel against sequential input screening (`server.input_screening`), at several guard latencies.

Every server is its own process on loopback: a fake upstream answering after UPSTREAM_DELAY_S, a scripted guard
answering every verdict after the given latency, and two RSafe Proxies in front of them that differ only in
`server.input_screening`. Non-streamed chat completions, one at a time, each with its own prompt (no cached
verdict). The floors: parallel max(guard, upstream) + guard (the output screen), sequential guard + upstream +
guard.

    python benchmarks/input_screening.py [--requests 10] [--guard-ms 50 200 800]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from proxy_overhead import free_port, load, process, proxy_env  # noqa: E402
from workers import percentile, rsafe_proxy  # noqa: E402

UPSTREAM_DELAY_S = 0.2
MODES = ("parallel", "sequential")


@dataclass
class Cell:
    """One mode at one guard latency."""

    guard_ms: int
    mode: str
    p50_ms: float
    p99_ms: float
    floor_ms: float
    latencies_ms: list[float] = field(repr=False)

    def row(self) -> str:
        over = self.p50_ms - self.floor_ms
        figures = f"{self.p50_ms:.0f} | {self.p99_ms:.0f} | {self.floor_ms:.0f} | {over:+.0f}"
        return f"| {self.guard_ms} | {self.mode} | {figures} |"


HEADER = (
    "| guard ms | input screening | p50 ms | p99 ms | floor ms | p50 - floor |\n"
    "| ---: | --- | ---: | ---: | ---: | ---: |"
)


def config(work: Path, mode: str) -> Path:
    """The packaged proxy.yaml with `server.input_screening: mode`."""
    from rsafe_proxy.config import packaged_config_path

    text = packaged_config_path().read_text(encoding="utf-8")
    assert "input_screening: parallel" in text
    path = work / f"proxy-{mode}.yaml"
    path.write_text(text.replace("input_screening: parallel", f"input_screening: {mode}"), encoding="utf-8")
    return path


def floor_ms(mode: str, guard_ms: int) -> float:
    upstream = UPSTREAM_DELAY_S * 1000
    return (max(guard_ms, upstream) if mode == "parallel" else guard_ms + upstream) + guard_ms


def run(requests: int, guard_ms: list[int]) -> list[Cell]:
    """Both modes at every guard latency in `guard_ms`."""
    cells: list[Cell] = []
    work = Path(tempfile.mkdtemp(prefix="rsafe-input-bench-"))
    python, script = sys.executable, str(HERE / "doubles_server.py")
    try:
        for latency in guard_ms:
            up, guard = free_port(), free_port()
            with ExitStack() as stack:
                for kind, port, delay in (("upstream", up, UPSTREAM_DELAY_S), ("guard", guard, latency / 1000)):
                    ready = f"http://127.0.0.1:{port}/v1/models"
                    stack.enter_context(process([python, script, kind, str(port), str(delay)], ready, cwd=str(work)))
                urls = {}
                for mode in MODES:
                    port = free_port()
                    env = proxy_env(up, guard, str(work), "sk-bench")
                    env["RSAFE_STATE_DIR"] = str(work / f"state-{mode}")
                    argv = [rsafe_proxy(), "serve", "--config", str(config(work, mode)), "--port", str(port)]
                    argv += ["--log-level", "warning"]
                    stack.enter_context(process(argv, f"http://127.0.0.1:{port}/readyz", env, str(work)))
                    urls[mode] = f"http://127.0.0.1:{port}/v1/chat/completions"
                for mode, url in urls.items():
                    latencies, _ = asyncio.run(load(url, requests, 1, {"authorization": "Bearer sk-bench"}))
                    ms = [value * 1000 for value in latencies]
                    cells.append(
                        Cell(latency, mode, statistics.median(ms), percentile(ms, 0.99), floor_ms(mode, latency), ms)
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10, help="requests per cell, one at a time")
    parser.add_argument("--guard-ms", type=int, nargs="+", default=[50, 200, 800], help="guard latencies")
    args = parser.parse_args()
    print(f"upstream answers after {UPSTREAM_DELAY_S * 1000:.0f} ms; medians of {args.requests} requests\n")
    print(HEADER)
    for cell in run(args.requests, args.guard_ms):
        print(cell.row())


if __name__ == "__main__":
    main()
