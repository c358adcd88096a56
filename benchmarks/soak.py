"""Soak: many streaming clients through the proxy for a while, then slow clients beside normal traffic.

Bounded and loopback-only. Each server is its own process: a fake upstream that streams chat answers (a word
every TOKEN_DELAY_S), a scripted guard (instant, then 200 ms per verdict) and RSafe Proxy (`rsafe-proxy serve`
with its packaged configuration and default limits). The client process runs `--clients` concurrent streaming
chat completions for `--seconds` per guard, each prompt unique (no verdict comes from the cache), and counts as
an error anything but a 200 that ends with `data: [DONE]`. Then the slow-client run holds `--idle` TCP
connections open that send nothing while normal streaming traffic goes on: the normal requests must succeed and
the idle connections must be closed by the proxy's header timeout (server.header_timeout_s, 10 s by default).
The proxy's RSS and open descriptors are read from /proc at start, after each run and after idling.

    python benchmarks/soak.py [--seconds 60] [--clients 200] [--idle 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from proxy_overhead import free_port, proxy_env, wait_ready

HERE = Path(__file__).resolve().parent
TOKEN_DELAY_S = 0.02  # between streamed words: a 36-word answer streams in about 0.7 s
PROMPT_WORDS = " ".join(f"w{number}" for number in range(32))
IDLE_AFTER_S = 8.0  # the clients have closed their pools by then: what stays open is the proxy's own


def serve_double(kind: str, port: int, delay_s: float) -> None:
    """`soak.py _double upstream|guard PORT DELAY_S`: one test double under uvicorn (its own process)."""
    import uvicorn

    sys.path.insert(0, str(HERE.parent))
    from tests.doubles import ScriptedGuard
    from tests.fake_upstream import FakeUpstream

    app = FakeUpstream(token_delay_s=delay_s).app if kind == "upstream" else ScriptedGuard(delay_s=delay_s).app
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, backlog=4096)


@contextmanager
def started(command: list[str], ready_url: str, env: dict[str, str], cwd: str, log: Path) -> Iterator[int]:
    """Run `command` until the block ends; yields its pid once `ready_url` answers."""
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(ready_url)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def double(kind: str, port: int, delay_s: float, work: str) -> AbstractContextManager[int]:
    command = [sys.executable, str(Path(__file__).resolve()), "_double", kind, str(port), str(delay_s)]
    path = "/v1/models"
    return started(command, f"http://127.0.0.1:{port}{path}", dict(os.environ), work, Path(work) / f"{kind}.log")


@dataclass(frozen=True)
class Usage:
    """What the proxy process holds at one moment."""

    rss_mib: float
    fds: int


def usage(pid: int) -> Usage:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return Usage(rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd")))


@dataclass
class Load:
    """The outcome of one run of streaming clients."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    error_times: list[float] = field(default_factory=list)  # seconds into the run
    started: float = field(default_factory=time.monotonic)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.error_times.append(time.monotonic() - self.started)


async def stream_clients(url: str, clients: int, seconds: float, load: Load) -> None:
    """`clients` loops, each sending one streaming chat completion after another until `seconds` pass."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    load.started = time.monotonic()
    deadline = load.started + seconds
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(worker: int) -> None:
            number = 0
            while time.monotonic() < deadline:
                number += 1
                prompt = f"Client {worker} request {number}: {PROMPT_WORDS}"
                body = {"model": "fake-model", "messages": [{"role": "user", "content": prompt}], "stream": True}
                begun = time.perf_counter()
                try:
                    async with client.stream("POST", url, json=body) as response:
                        last = ""
                        async for line in response.aiter_lines():
                            if line.startswith("data: "):
                                last = line
                    if response.status_code != 200:
                        load.error(f"status {response.status_code}")
                    elif last != "data: [DONE]":
                        load.error("no [DONE]")
                    else:
                        load.latencies.append(time.perf_counter() - begun)
                except httpx.HTTPError as error:
                    load.error(type(error).__name__)

        await asyncio.gather(*(one(worker) for worker in range(clients)))


@dataclass
class Idle:
    """The idle connections of the slow-client run: how many the proxy closed, and after how long."""

    opened: int = 0
    refused: int = 0
    closed_after: list[float] = field(default_factory=list)


async def hold_idle(port: int, count: int, hold_s: float, idle: Idle) -> None:
    """Open `count` connections that send nothing; note when the proxy closes each (within `hold_s`)."""

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            idle.refused += 1
            return
        idle.opened += 1
        opened = time.monotonic()
        try:
            if await asyncio.wait_for(reader.read(1), hold_s) == b"":
                idle.closed_after.append(time.monotonic() - opened)
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000 if ordered else float("nan")


def load_row(name: str, seconds: float, load: Load, before: Usage, after: Usage) -> str:
    served, latencies = len(load.latencies), load.latencies
    errors = sum(load.errors.values())
    when = ", ".join(f"{moment:.1f}" for moment in load.error_times[:5])
    kinds = ", ".join(f"{k}: {v}" for k, v in load.errors.items())
    detail = f" ({kinds}; at {when} s)" if load.errors else ""
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    return (
        f"| {name:<26} | {seconds:5.0f} | {served:8d} | {errors:6d}{detail} | {p50:7.0f} | "
        f"{percentile(latencies, 0.95):7.0f} | {percentile(latencies, 0.99):7.0f} | "
        f"{before.rss_mib:5.0f} → {after.rss_mib:5.0f} | {before.fds:4d} → {after.fds:4d} |"
    )


def raise_own_file_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_double":
        serve_double(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60, help="length of each streaming run (default 60)")
    parser.add_argument("--clients", type=int, default=200, help="concurrent streaming clients (default 200)")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections in the slow-client run")
    parser.add_argument("--slow-clients", type=int, default=50, help="normal clients beside the idle ones")
    args = parser.parse_args()
    limit = raise_own_file_limit(args.idle + args.clients + 256)
    if limit < args.idle + args.clients + 64:
        raise SystemExit(f"the open-file limit ({limit}) is too low for {args.idle} idle connections")

    work = tempfile.mkdtemp(prefix="rsafe-soak-")
    up, guard, proxy = free_port(), free_port(), free_port()
    env = proxy_env(up, guard, work, "sk-soak")
    exe = shutil.which("rsafe-proxy", path=os.path.dirname(sys.executable)) or "rsafe-proxy"
    proxy_command = [exe, "serve", "--port", str(proxy), "--log-level", "warning"]
    url = f"http://127.0.0.1:{proxy}/v1/chat/completions"
    rows: list[str] = []
    marks: list[tuple[str, Usage]] = []
    with (
        double("upstream", up, TOKEN_DELAY_S, work),
        started(proxy_command, f"http://127.0.0.1:{proxy}/healthz", env, work, Path(work) / "proxy.log") as pid,
    ):
        for name, delay in (("instant guard", 0.0), ("200 ms guard", 0.2)):
            with double("guard", guard, delay, work):
                asyncio.run(stream_clients(url, 4, 1, Load()))  # warm the pools
                before = usage(pid)
                marks.append((f"before {name}", before))
                load = Load()
                asyncio.run(stream_clients(url, args.clients, args.seconds, load))
                after = usage(pid)
                marks.append((f"after {name}", after))
                rows.append(load_row(f"{args.clients} streams, {name}", args.seconds, load, before, after))
                time.sleep(IDLE_AFTER_S)
                marks.append((f"idle {IDLE_AFTER_S:.0f} s after {name}", usage(pid)))

        with double("guard", guard, 0.0, work):
            hold_s = 20.0  # past the 10 s header timeout, with room
            before = usage(pid)
            idle, load = Idle(), Load()

            async def slow_run() -> Usage:
                holding = asyncio.ensure_future(hold_idle(proxy, args.idle, hold_s, idle))
                await asyncio.sleep(1)  # the idle connections are open before the normal traffic starts
                held = usage(pid)
                await stream_clients(url, args.slow_clients, hold_s - 4, load)
                await holding
                return held

            held = asyncio.run(slow_run())
            after = usage(pid)
            rows.append(load_row(f"{args.slow_clients} streams + {args.idle} idle", hold_s - 4, load, before, after))
            time.sleep(IDLE_AFTER_S)
            marks += [("slow run: idle ones open", held), ("after slow run", after)]
            marks.append((f"idle {IDLE_AFTER_S:.0f} s after slow run", usage(pid)))

    print(f"upstream: a word every {TOKEN_DELAY_S * 1000:.0f} ms (36 words); latency = whole stream, to [DONE]\n")
    print("| run | s | served | errors | p50 ms | p95 ms | p99 ms | proxy RSS MiB | proxy fds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print("\n| proxy at                            | RSS MiB | open fds |")
    print("| ----------------------------------- | ------- | -------- |")
    for name, mark in marks:
        print(f"| {name:<35} | {mark.rss_mib:7.0f} | {mark.fds:8d} |")
    closed = sorted(idle.closed_after)
    median = f"{statistics.median(closed):.1f} s" if closed else "-"
    print(
        f"\nslow clients: {idle.opened} idle connections opened ({idle.refused} refused); {len(closed)} closed by "
        f"the proxy within {hold_s:.0f} s (median {median} after opening; header timeout 10 s); normal requests "
        f"beside them: {len(load.latencies)} served, {sum(load.errors.values())} errors"
    )
    print(f"\nlogs: {work}")


if __name__ == "__main__":
    main()
