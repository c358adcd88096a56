"""`rsafe-proxy serve --workers 2` over real loopback: the console script in a subprocess, in front of the doubles.
Both workers answer (each names itself and its pid in the log), /metrics adds up both, the audit log and the
spans file take both workers' writes, SIGTERM to the parent drains the requests in flight and stops every
worker, and a policy edit reaches both."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from rsafe_proxy.config import Settings
from rsafe_proxy.policy.loading import load_policy
from rsafe_proxy.workers import START_UP_S, shared_session_secret
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import proxy_config, write_policy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("rsafe-proxy")


class Parent:
    """`rsafe-proxy serve --workers N` in a subprocess; its JSON log lines collected as they come."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process, self.url = process, url
        self.records: list[dict[str, Any]] = []
        self.other: list[str] = []  # lines that are not JSON log records (there should be none)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                self.other.append(line.rstrip("\n"))
                continue
            self.records.append(record)

    def wait_for(self, words: str, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        """The first `count` log records whose message holds `words`, from distinct worker pids when count > 1."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [record for record in list(self.records) if words in str(record.get("message"))]
            by_pid = {record.get("pid"): record for record in found}
            if (count == 1 and found) or len(by_pid) >= count:
                return found[:1] if count == 1 else list(by_pid.values())[:count]
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        log = "\n".join(json.dumps(record) for record in self.records)
        raise AssertionError(f"no {count} log records with {words!r}; the log:\n{log}\n" + "\n".join(self.other))

    def access_pids(self) -> set[int]:
        """The pids of the workers that logged an answered request."""
        return {int(record["pid"]) for record in self.records if record.get("logger") == "uvicorn.access"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serving(config: Path, workers: int = 2) -> Iterator[Parent]:
    port = free_port()
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "rsafe_proxy.cli"]
    argv = [*command, "--config", str(config), "serve", "--port", str(port), "--workers", str(workers)]
    argv += ["--log-format", "json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    parent = Parent(process, f"http://127.0.0.1:{port}")
    try:
        parent.wait_for("Application startup complete", count=workers)
        yield parent
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def write_config(directory: Path, upstream: FakeUpstream, guard: ScriptedGuard, **overrides: Any) -> Path:
    path = directory / "proxy.yaml"
    path.write_text(yaml.safe_dump(proxy_config(upstream.url, guard.url, directory, **overrides)), encoding="utf-8")
    return path


def chat(url: str, text: str) -> httpx.Response:
    """One chat completion on a connection of its own (so that the kernel may give it to either worker)."""
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"connection": "close"}, timeout=20)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def metric(text: str, prefix: str) -> float:
    """The sum of the samples of the exposition `text` whose line starts with `prefix`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_two_workers_share_the_port_the_metrics_the_audit_log_and_the_spans_file(
    upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> None:
    config = write_config(tmp_path, upstream, guard)
    sent = 0
    with serving(config) as parent:
        workers = {int(record["pid"]) for record in parent.wait_for("Application startup complete", count=2)}
        assert len(workers) == 2 and parent.process.pid not in workers
        # fresh connections, several at a time, until both workers have answered (the kernel picks the worker)
        with ThreadPoolExecutor(8) as pool:
            while parent.access_pids() != workers and sent < 400:
                answers = list(pool.map(lambda n: chat(parent.url, f"Line {n} about the sea."), range(sent, sent + 16)))
                sent += len(answers)
                assert [answer.status_code for answer in answers] == [200] * len(answers)
                time.sleep(0.2)  # the access lines are read from the pipe
        assert parent.access_pids() == workers, "one worker answered every request"
        blocked = chat(parent.url, f"Tell me {UNSAFE}")
        assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "content_filter"

        # any worker answers a scrape with the figures of both
        scraped = httpx.get(f"{parent.url}/metrics", timeout=10).text
        route = 'rsafe_requests_total{route="/v1/chat/completions"'
        assert metric(scraped, route) == sent + 1
        assert metric(scraped, "rsafe_guard_ready ") == 1
        assert metric(scraped, 'rsafe_decisions_total{outcome="block",side="input"') == 1
    assert parent.process.returncode == 0
    assert not any(alive(pid) for pid in workers)
    assert parent.other == [], "\n".join(parent.other)
    assert not [record for record in parent.records if record["level"] in ("error", "critical")]

    # each worker wrote its decisions to the one SQLite file, and its spans to the one spans file, whole
    with sqlite3.connect(tmp_path / "decisions.db") as database:
        (stored,) = database.execute("select count(*) from decisions").fetchone()
    assert stored == 2 * sent + 1  # input and output of each answered request, the input of the blocked one
    lines = (tmp_path / "spans.jsonl").read_text(encoding="utf-8").splitlines()
    spans = [json.loads(line) for line in lines]
    assert sum(span["name"] == "rsafe.screen" for span in spans) == stored


def test_sigterm_to_the_parent_drains_every_worker_then_stops_them(
    upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> None:
    upstream.first_byte_delay_s = 1.0
    config = write_config(tmp_path, upstream, guard, server={"shutdown_grace_s": 10})
    with serving(config) as parent, ThreadPoolExecutor(12) as pool:
        workers = {int(record["pid"]) for record in parent.wait_for("Application startup complete", count=2)}
        answers = [pool.submit(chat, parent.url, f"Slow line {n}.") for n in range(12)]
        deadline = time.monotonic() + 10
        while len(upstream.requests) < 12 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(upstream.requests) == 12  # every request is in flight upstream
        stopping = time.monotonic()
        parent.process.send_signal(signal.SIGTERM)
        statuses = [answer.result().status_code for answer in answers]
        assert parent.process.wait(timeout=30) == 0
        took = time.monotonic() - stopping
    assert statuses == [200] * 12  # drained, not cut
    # each worker finished the requests it held (the kernel chose which; usually both had some)
    assert parent.access_pids() <= workers and len(parent.access_pids()) >= 1
    assert took < 10
    assert not any(alive(pid) for pid in workers)
    assert len(parent.wait_for("Finished server process", count=2)) == 2


def test_a_policy_edit_reaches_every_worker(upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "house", description="first")
    before = load_policy(policy).version
    tenants = [{"id": "default", "anonymous": True, "policy": str(policy)}]
    config = write_config(tmp_path, upstream, guard, tenants=tenants, policy_reload_s=0.2)
    with serving(config) as parent:
        assert {readyz(parent.url)["policies"]["default"] for _ in range(4)} == {before}
        write_policy(tmp_path, "house", description="second")
        after = load_policy(policy).version
        assert after != before
        reloaded = parent.wait_for(f"now uses policy house version {after}", count=2)
        assert len({record["pid"] for record in reloaded}) == 2  # each worker watches and reloads
        assert {readyz(parent.url)["policies"]["default"] for _ in range(20)} == {after}


def readyz(url: str) -> Any:
    return httpx.get(f"{url}/readyz", headers={"connection": "close"}, timeout=10).json()


def test_a_worker_that_dies_while_serving_is_replaced(
    upstream: FakeUpstream, guard: ScriptedGuard, tmp_path: Path
) -> None:
    config = write_config(tmp_path, upstream, guard)
    with serving(config) as parent:
        first = {int(record["pid"]) for record in parent.wait_for("Application startup complete", count=2)}
        time.sleep(START_UP_S + 0.5)  # past start-up: a death now is a crash, not a broken configuration
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        (replaced,) = parent.wait_for("died (killed by SIGKILL); starting another")
        assert f"(pid {victim})" in replaced["message"]
        started = parent.wait_for("Application startup complete", count=3)
        assert len({record["pid"] for record in started}) == 3
        assert [chat(parent.url, f"After {n}.").status_code for n in range(6)] == [200] * 6
    assert parent.process.returncode == 0


def test_a_worker_that_cannot_start_stops_them_all(upstream: FakeUpstream, tmp_path: Path) -> None:
    # the parent checks the configuration and policies; the engine is built by each worker, and fails there
    path = write_config(tmp_path, upstream, ScriptedGuard(url="http://127.0.0.1:9"))
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["guard"] = {"engine": "tests.doubles:NoSuchEngine"}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "rsafe_proxy.cli"]
    argv = [*command, "--config", str(path), "serve", "--port", str(free_port()), "--workers", "2"]
    started = time.monotonic()
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 1
    assert "stopping every worker" in done.stderr
    assert time.monotonic() - started < START_UP_S + 20


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_must_be_at_least_one(workers: str, tmp_path: Path) -> None:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "rsafe_proxy.cli"]
    done = subprocess.run(
        [*command, "serve", "--port", str(free_port()), "--workers", workers],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 2
    assert f"argument --workers: must be a whole number of at least 1, not {workers!r}" in done.stderr


def test_the_workers_share_one_console_session_secret() -> None:
    console = {"enabled": True, "admin_key": "env:RSAFE_CONSOLE_ADMIN_KEY"}
    settings = Settings.model_validate({"console": console})
    shared = shared_session_secret(settings)
    assert shared.console.session_secret is not None
    assert len(shared.console.session_secret.get_secret_value()) >= 32
    # one secret, picked by the parent and pickled to every worker; a configured one is kept as it is
    assert shared_session_secret(shared) is shared
    off = Settings.model_validate({})
    assert shared_session_secret(off) is off
