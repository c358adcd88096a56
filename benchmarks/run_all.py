"""Every benchmark in one run: proxy overhead (direct upstream, RSafe Proxy, LiteLLM at concurrency 1, 16, 64),
streams (TTFT and total per stream mode and window plan, text released before its verdict), parallel against
sequential input screening (guard 50, 200, 800 ms), and 1 against 2 worker processes. Prints each part's tables,
writes them with the raw latencies to a JSON file, and plots the latency distributions to a PNG.

    python benchmarks/run_all.py [--quick] [--out benchmarks/results] [--litellm PATH | --no-litellm]

`--quick` runs every part with few requests (a minute or two): a check that everything runs, not figures to
quote. LiteLLM is measured when `--litellm` names its executable, or (not with --quick, where starting it would
take most of the time) when .venv-litellm/bin/litellm exists.
Needs the `bench` extra (matplotlib) for the plot: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import input_screening  # noqa: E402
import proxy_overhead  # noqa: E402
import streaming  # noqa: E402
import workers  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """How much each part runs."""

    overhead_requests: int
    concurrency: tuple[int, ...]
    stream_requests: int
    stream_guard_ms: tuple[int, ...]
    input_requests: int
    input_guard_ms: tuple[int, ...]
    worker_requests: int
    worker_concurrency: int


FULL = Plan(200, (1, 16, 64), 5, (50, 200, 800), 10, (50, 200, 800), 2000, 32)
QUICK = Plan(30, (1, 16, 64), 1, (50,), 2, (50, 200, 800), 200, 16)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = Path("/proc/meminfo").read_text().split()[1] if Path("/proc/meminfo").exists() else "0"
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def litellm_executable(args: argparse.Namespace) -> str | None:
    """LiteLLM's executable: the one named, else .venv-litellm's (not in a quick run: it takes a minute to start)."""
    if args.litellm:
        return str(args.litellm)
    if args.no_litellm or args.quick:
        return None
    found = HERE.parent / ".venv-litellm" / "bin" / "litellm"
    return str(found) if found.exists() else None


def part(title: str) -> float:
    print(f"\n## {title}\n", flush=True)
    return time.monotonic()


def done(started: float) -> None:
    print(f"\n({time.monotonic() - started:.0f} s)", flush=True)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Latency distributions, one panel per part; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    overhead = results["overhead"]
    concurrencies = sorted({cell["concurrency"] for cell in overhead})
    figure, axes = plt.subplots(1, len(concurrencies) + 2, figsize=(5 * (len(concurrencies) + 2), 4.5))
    for axis, concurrency in zip(axes, concurrencies, strict=False):
        for cell in (cell for cell in overhead if cell["concurrency"] == concurrency):
            values = sorted(cell["latencies_ms"])
            shares = [(index + 1) / len(values) for index in range(len(values))]
            axis.plot(values, shares, label=cell["target"])
        axis.set_title(f"overhead, concurrency {concurrency}")
        axis.set_xlabel("latency ms")
        axis.set_ylabel("share of requests")
        axis.legend(fontsize=7)
    screening = results["input_screening"]
    axis = axes[len(concurrencies)]
    labels = [f"{cell['mode'][:3]} {cell['guard_ms']}" for cell in screening]
    axis.boxplot([cell["latencies_ms"] for cell in screening], tick_labels=labels)
    axis.set_title("input screening (guard ms)")
    axis.set_ylabel("latency ms")
    axis = axes[-1]
    for cell in results["workers"]:
        values = sorted(cell["latencies_ms"])
        axis.plot(values, [(index + 1) / len(values) for index in range(len(values))], label=f"{cell['workers']} w")
    axis.set_title(f"workers, concurrency {results['workers'][0]['concurrency']}")
    axis.set_xlabel("latency ms")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few requests per part: proves it runs")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and the PNG")
    parser.add_argument("--litellm", help="a `litellm` executable (default: .venv-litellm/bin/litellm if present)")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {"date": stamp, "quick": args.quick, "plan": asdict(plan), "machine": machine()}
    print(f"# RSafe Proxy benchmarks ({'quick' if args.quick else 'full'} run, {stamp})")
    print(json.dumps(results["machine"]))

    started = part("Proxy overhead (non-streamed chat, upstream 50 ms, guard 20 ms per verdict)")
    cells = proxy_overhead.measure_all(plan.overhead_requests, list(plan.concurrency), litellm_executable(args))
    proxy_overhead.print_cells(cells)
    results["overhead"] = [asdict(cell) for cell in cells]
    done(started)

    started = part("Streams: time to first text and total, per plan")
    tables = streaming.stream_tables(plan.stream_requests, list(plan.stream_guard_ms))
    for table in tables:
        streaming.print_stream_table(table, plan.stream_requests)
    results["streams"] = tables
    done(started)

    started = part(
        f"Input screening, parallel and sequential (upstream {input_screening.UPSTREAM_DELAY_S * 1000:.0f} ms)"
    )
    screened = input_screening.run(plan.input_requests, list(plan.input_guard_ms))
    print(input_screening.HEADER)
    for cell in screened:
        print(cell.row())
    results["input_screening"] = [asdict(cell) for cell in screened]
    done(started)

    started = part(f"Workers, doubles answering at once, concurrency {plan.worker_concurrency}")
    scaled = workers.run(plan.worker_requests, plan.worker_concurrency, [1, 2])
    workers.print_cells(scaled)
    results["workers"] = [asdict(cell) for cell in scaled]
    done(started)

    results["machine"]["load_average_at_end"] = os.getloadavg()
    name = f"run-{'quick-' if args.quick else ''}{stamp}"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out / f'{name}.json'}")
    if plot(results, args.out / f"{name}.png"):
        print(f"wrote {args.out / f'{name}.png'}")


if __name__ == "__main__":
    main()
