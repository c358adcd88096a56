"""Streamed answers through RSafe Proxy: time to first text and total time against the direct upstream, for each
stream mode and window plan, with a scripted guard of fixed latency; and the text each plan let out before its
verdict. Then the guard tokens each window costs with and without prefix reuse (the transformers engine).

Every server is its own process on loopback: a fake upstream streaming an 80-word answer a word every
WORD_DELAY_S (about 2 s, a usual hosted model's pace), a scripted guard answering every verdict after
`--guard-ms` (input and output screens alike) that records when it answered what, and RSafe Proxy with one
tenant per plan (chosen by API key). Requests go one at a time, each with its own prompt (no verdict comes from
the cache). TTFT is the arrival of the first text delta, total the end of the stream; "ahead" is the most text
(characters) the client held at any moment that no verdict had passed yet (chunked and buffer: must be 0).

The token part runs a tiny random Gemma 3 (tests/tiny_models.py) in the transformers engine, in score mode, on
the rsafe-compact prompts of consecutive windows of the same answer; it reads the engine's counters
(prompt_tokens, cached_tokens) and counts the tokens its forward passes really computed (a hook on the model's
embedding).

    python benchmarks/streaming.py [--requests 5] [--guard-ms 50 200] [--no-tokens]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from proxy_overhead import free_port, wait_ready  # noqa: E402

WORD_DELAY_S = 0.025
ANSWER = " ".join(
    [
        "The sea covers most of the planet and shapes its weather.",
        "Warm currents carry heat from the tropics toward the poles, and cold ones return it.",
        "Along the coasts, tides rise and fall twice a day as the moon pulls on the water.",
        "Fishing towns grew where the shallow shelves fed large schools of fish.",
        "Sailors learned to read the wind, the stars and the colour of the waves.",
        "Today ships still carry most of the goods that cross the world, slowly and cheaply.",
    ]
)
# name -> the policy's stream settings
PLANS: dict[str, dict[str, Any]] = {
    "chunked, fixed 600, one at a time (before)": {
        "mode": "chunked",
        "first_window_chars": 600,
        "window_chars": 600,
        "windows_in_flight": 1,
    },
    "chunked, 64 growing to 600, one at a time": {"mode": "chunked", "windows_in_flight": 1},
    "chunked, 64 growing to 600, pipelined (default)": {"mode": "chunked"},
    "chunked, 32 growing to 600, pipelined": {"mode": "chunked", "first_window_chars": 32},
    "buffer": {"mode": "buffer"},
    "async": {"mode": "async"},
}


# -- the doubles, each in its own process ---------------------------------------------------------------------


def serve_double(kind: str, port: int, delay_s: float) -> None:
    """`streaming.py _double upstream|guard PORT DELAY_S`."""
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from tests.doubles import ScriptedGuard, read_conversation
    from tests.fake_upstream import FakeUpstream

    if kind == "upstream":
        uvicorn.run(
            FakeUpstream(answer=ANSWER, token_delay_s=delay_s).app, host="127.0.0.1", port=port, log_level="warning"
        )
        return

    @dataclass
    class TimedGuard(ScriptedGuard):
        """The scripted guard, recording when it answered each verdict (wall clock) and what it judged."""

        answered: list[dict[str, Any]] = field(default_factory=list)

        async def _chat(self, request: Request) -> Response:
            began = time.time()
            response = await super()._chat(request)
            body = await request.json()  # read before, kept by the request
            prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
            side, judged = read_conversation(prompt)
            at = time.time()
            self.answered.append({"at": at, "took": at - began, "side": side, "judged": judged, "prompt": prompt})
            return response

        async def _answered(self, request: Request) -> Response:
            return JSONResponse(self.answered)

    guard = TimedGuard(delay_s=delay_s)
    app = guard.app
    app.router.routes.append(Route("/answered", guard._answered, methods=["GET"]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextmanager
def started(command: list[str], ready_url: str, env: dict[str, str], cwd: str, log: Path) -> Iterator[None]:
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(ready_url)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def double(kind: str, port: int, delay_s: float, work: str) -> Any:
    command = [sys.executable, str(Path(__file__).resolve()), "_double", kind, str(port), str(delay_s)]
    return started(command, f"http://127.0.0.1:{port}/v1/models", dict(os.environ), work, Path(work) / f"{kind}.log")


def key_of(plan: str) -> str:
    return "sk-" + hashlib.sha256(plan.encode()).hexdigest()[:24]


def proxy(port: int, upstream: int, guard: int, work: str) -> Any:
    """RSafe Proxy with one tenant (and policy) per plan."""
    tenants = []
    for number, (plan, stream) in enumerate(PLANS.items()):
        policy = {
            "id": f"plan-{number}",
            "categories": [{"id": "U1", "name": "Violence & Physical Harm"}, {"id": "U2", "name": "Weapons"}],
            "stream": stream,
        }
        path = Path(work) / f"plan-{number}.yaml"
        path.write_text(yaml.safe_dump(policy, sort_keys=False), encoding="utf-8")
        digest = hashlib.sha256(key_of(plan).encode()).hexdigest()
        tenants.append({"id": f"plan-{number}", "keys": [f"sha256:{digest}"], "policy": str(path)})
    config = {
        "server": {"port": port},
        "upstream": {"base_url": f"http://127.0.0.1:{upstream}/v1", "api_key": "sk-upstream"},
        "guard": {"engine": "openai", "url": f"http://127.0.0.1:{guard}/v1", "model": "scripted-guard"},
        "tenants": tenants,
        "telemetry": {"spans_file": None},
        "audit": {"url": str(Path(work) / "decisions.db")},
        "policy_reload_s": 0,
    }
    (Path(work) / "proxy.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    exe = shutil.which("rsafe-proxy", path=os.path.dirname(sys.executable)) or "rsafe-proxy"
    command = [exe, "--config", str(Path(work) / "proxy.yaml"), "serve", "--log-level", "warning"]
    return started(command, f"http://127.0.0.1:{port}/healthz", dict(os.environ), work, Path(work) / "proxy.log")


# -- the client ---------------------------------------------------------------------------------------------------


@dataclass
class Streamed:
    """One streamed answer as the client saw it: (seconds since the request, wall clock, text so far) per delta."""

    prompt: str
    started: float
    arrivals: list[tuple[float, float, str]] = field(default_factory=list)
    total: float = 0.0

    @property
    def ttft(self) -> float:
        return self.arrivals[0][0]

    @property
    def text(self) -> str:
        return self.arrivals[-1][2] if self.arrivals else ""


async def stream_once(client: httpx.AsyncClient, url: str, key: str, prompt: str) -> Streamed:
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    seen = Streamed(prompt, time.perf_counter())
    text = ""
    async with client.stream("POST", url, json=body, headers={"authorization": f"Bearer {key}"}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    text += piece
                    seen.arrivals.append((time.perf_counter() - seen.started, time.time(), text))
    seen.total = time.perf_counter() - seen.started
    return seen


def ahead(seen: Streamed, answered: list[dict[str, Any]]) -> tuple[int, list[int]]:
    """The most characters the client held that no output verdict had passed yet, or before the input's verdict
    came (all of them: the windows are judged while the input is, never released before it), and the lengths
    judged."""
    mine = [a for a in answered if a["side"] == "output" and seen.prompt in a["prompt"]]
    mine = [a for a in mine if ANSWER.startswith(a["judged"])]  # each window: the answer so far
    passed = min((a["at"] for a in answered if a["side"] == "input" and seen.prompt in a["prompt"]), default=None)
    worst = 0
    for _, wall, text in seen.arrivals:
        covered = max((len(a["judged"]) for a in mine if a["at"] <= wall), default=0)
        if passed is None or wall < passed:
            covered = 0
        worst = max(worst, len(text.strip()) - covered)
    return worst, sorted(len(a["judged"]) for a in mine)


def fill_time(direct: list[Streamed], chars: int) -> float:
    """Seconds from the first text until the direct stream had produced `chars` characters (median of runs)."""
    times = []
    for seen in direct:
        reached = next((at for at, _, text in seen.arrivals if len(text.strip()) >= chars), seen.arrivals[-1][0])
        times.append(reached - seen.ttft)
    return statistics.median(times)


async def measure(proxy_port: int, upstream_port: int, guard_port: int, requests: int) -> tuple[list[str], float]:
    """The table's rows, and the guard's latency as measured inside it (its delay is slept in 10 ms polls)."""
    rows = []
    async with httpx.AsyncClient(timeout=60) as client:
        direct_url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
        await stream_once(client, direct_url, "sk-upstream", "warm up")
        direct = [await stream_once(client, direct_url, "sk-upstream", f"direct {n}") for n in range(requests)]
        base_ttft = statistics.median(s.ttft for s in direct)
        base_total = statistics.median(s.total for s in direct)
        rows.append(f"| direct upstream | {base_ttft * 1000:.0f} | {base_total * 1000:.0f} | - | - | - | - | - |")
        url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        runs: dict[str, list[Streamed]] = {}
        for number, plan in enumerate(PLANS):
            await stream_once(client, url, key_of(plan), f"warm up {number}")
            runs[plan] = [
                await stream_once(client, url, key_of(plan), f"plan {number} request {n}") for n in range(requests)
            ]
        answered = (await client.get(f"http://127.0.0.1:{guard_port}/answered")).json()
        guard_s = statistics.median(a["took"] for a in answered)
        for plan, seen in runs.items():
            assert all(s.text == ANSWER for s in seen), plan
            ttft = statistics.median(s.ttft for s in seen)
            total = statistics.median(s.total for s in seen)
            checks = [ahead(s, answered) for s in seen]
            worst = max(check[0] for check in checks)
            windows = statistics.median(len(check[1]) for check in checks)
            first = min(check[1][0] for check in checks)
            bound = fill_time(direct, first) + guard_s
            rows.append(
                f"| {plan} | {ttft * 1000:.0f} | {total * 1000:.0f} | {(ttft - base_ttft) * 1000:+.0f} "
                f"(≤ {bound * 1000:.0f}) | {(total - base_total) * 1000:+.0f} (≤ {guard_s * 1000:.0f}) | "
                f"{first} | {windows:.0f} | {worst} |"
            )
    return rows, guard_s


def stream_tables(requests: int, guard_ms: list[int]) -> list[dict[str, Any]]:
    """For each guard latency: the table's rows and the latency the guard measured (benchmarks/run_all.py)."""
    tables = []
    for latency in guard_ms:
        work = tempfile.mkdtemp(prefix="rsafe-stream-bench-")
        upstream, guard, proxy_port = free_port(), free_port(), free_port()
        with ExitStack() as stack:
            stack.enter_context(double("upstream", upstream, WORD_DELAY_S, work))
            stack.enter_context(double("guard", guard, latency / 1000, work))
            stack.enter_context(proxy(proxy_port, upstream, guard, work))
            rows, measured = asyncio.run(measure(proxy_port, upstream, guard, requests))
        shutil.rmtree(work, ignore_errors=True)
        tables.append({"guard_ms": latency, "measured_guard_ms": round(measured * 1000), "rows": rows})
    return tables


STREAM_HEADER = (
    "| target | TTFT ms | total ms | TTFT - direct ms (goal) | total - direct ms (goal) "
    "| first window chars | windows | ahead chars |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def print_stream_table(table: dict[str, Any], requests: int) -> None:
    print(
        f"\nguard latency {table['guard_ms']} ms (measured in the guard: {table['measured_guard_ms']} ms), "
        f"{len(ANSWER.split())}-word answer ({len(ANSWER)} characters), "
        f"a word every {WORD_DELAY_S * 1000:.0f} ms; medians of {requests} requests\n"
    )
    print(STREAM_HEADER)
    for row in table["rows"]:
        print(row)


def run_streams(requests: int, guard_ms: list[int]) -> None:
    for table in stream_tables(requests, guard_ms):
        print_stream_table(table, requests)


# -- guard tokens per window, with and without prefix reuse -------------------------------------------------------


def run_tokens() -> None:
    import torch

    from rsafe_proxy.apis import CHAT
    from rsafe_proxy.apis.choices import DONE
    from rsafe_proxy.guard.cache import TTLCache
    from rsafe_proxy.guard.engines.transformers import TransformersEngine
    from rsafe_proxy.guard.protocol import Side
    from rsafe_proxy.guard.screen import Screener, ScreenSettings, Verdict
    from rsafe_proxy.policy.decide import Decision, Outcome
    from rsafe_proxy.policy.schema import Policy, StreamSettings
    from rsafe_proxy.streaming import WindowedScreen, sse_events
    from tests.tiny_models import build_tiny_model

    policy = Policy.model_validate(
        {"id": "tokens", "categories": [{"id": "U1", "name": "Violence"}, {"id": "U2", "name": "Weapons"}]}
    )
    computed = [0]

    def count(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, torch.nn.Embedding):
            computed[0] += int(args[0].numel())

    def chunk(text: str) -> bytes:
        payload = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    async def feed() -> AsyncIterator[bytes]:
        for word in ANSWER.split(" "):
            yield chunk(word + " ")
        yield DONE

    async def windows(folder: Path, reuse: bool) -> list[tuple[int, int, int, int]]:
        engine = TransformersEngine(model=str(folder), dtype="float32", prefix_cache=8192 if reuse else 0, threads=1)
        screener = Screener(engine, ScreenSettings(mode="score", template="rsafe-compact"), TTLCache[Verdict](0, 60))
        await engine.start()
        rows: list[tuple[int, int, int, int]] = []
        try:
            for other in ("Is the bread ready?", "Tell me about the hills."):  # the engine learns the policy prefix
                await screener.screen(policy, Side.OUTPUT, other, "Fine.")

            async def judge(index: int, text: str) -> Decision:
                before = computed[0]
                verdict = await screener.screen(policy, Side.OUTPUT, "Tell me about the sea.", text)
                rows.append(
                    (
                        len(text),
                        verdict.prompt_tokens,
                        verdict.prompt_tokens - verdict.cached_tokens,
                        computed[0] - before,
                    )
                )
                return Decision(Outcome.ALLOW, Side.OUTPUT)  # the tiny model's verdicts are noise: all pass

            screen = WindowedScreen(CHAT, StreamSettings(windows_in_flight=1), judge)
            async for _ in screen.run(sse_events(feed())):
                pass
        finally:
            await engine.aclose()
        return rows

    folder = build_tiny_model(Path(tempfile.mkdtemp(prefix="rsafe-tiny-")), 300, architecture="gemma3")
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        plain = asyncio.run(windows(folder, reuse=False))
        reused = asyncio.run(windows(folder, reuse=True))
    finally:
        handle.remove()
        shutil.rmtree(folder, ignore_errors=True)
    print(
        "\nguard tokens per window (tiny Gemma 3, score mode, rsafe-compact, the default plan, one window at a time)\n"
    )
    print("| window | answer chars | prompt tokens | no reuse: computed | reuse: read (counters) | reuse: computed |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for number, (off, on) in enumerate(zip(plain, reused, strict=True)):
        print(f"| {number} | {off[0]} | {off[1]} | {off[3]} | {on[2]} | {on[3]} |")
    print(
        f"| all | | {sum(r[1] for r in plain)} | {sum(r[3] for r in plain)} | {sum(r[2] for r in reused)} | "
        f"{sum(r[3] for r in reused)} |"
    )


def main() -> None:
    if sys.argv[1:2] == ["_double"]:
        serve_double(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--guard-ms", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--no-tokens", action="store_true", help="skip the guard-token measurement")
    parser.add_argument("--no-streams", action="store_true", help="skip the TTFT measurement")
    args = parser.parse_args()
    if not args.no_streams:
        run_streams(args.requests, args.guard_ms)
    if not args.no_tokens:
        run_tokens()


if __name__ == "__main__":
    main()
