"""The slim core (`pip install rsafe-proxy`, no `embedded` extra): the proxy with a served guard runs without
torch, transformers, gguf, peft or the model, and a command that needs the embedded model says which extra to
install in one line. Each command runs in a subprocess that refuses those imports (tests/without_embedded.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
EXTRA_LINE = "needs the 'embedded' extra, which is not installed"
INSTALL = "pip install 'rsafe-proxy[embedded]'"


def slim_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The environment of a slim command: run from `tmp_path` (no ./proxy.yaml: the packaged default applies),
    the guard and upstream variables unset unless given, refused imports logged to tmp_path/refused."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RSAFE_GUARD_", "OPENAI_"))}
    return {**env, "PYTHONPATH": str(ROOT), "RSAFE_REFUSED_LOG": str(tmp_path / "refused"), **variables}


def slim(tmp_path: Path, *argv: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """`rsafe-proxy ARGV…` without the embedded extra's modules."""
    command = [sys.executable, "-m", "tests.without_embedded", *argv]
    env = slim_env(tmp_path, **variables)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False)


def refused(tmp_path: Path) -> list[str]:
    """The imports of the embedded extra's modules that were attempted (and refused)."""
    log = tmp_path / "refused"
    return log.read_text(encoding="utf-8").split() if log.exists() else []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.1)
    return False


def test_serve_with_a_served_guard_screens_without_the_embedded_extra(
    guard: ScriptedGuard, upstream: FakeUpstream, tmp_path: Path
) -> None:
    port = _free_port()
    env = slim_env(tmp_path, RSAFE_GUARD_URL=f"{guard.url}/v1", OPENAI_BASE_URL=f"{upstream.url}/v1")
    command = [sys.executable, "-m", "tests.without_embedded", "serve", "--port", str(port)]
    url, log_path = f"http://127.0.0.1:{port}", tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stderr=log_file, stdout=subprocess.DEVNULL, cwd=tmp_path, env=env)
    try:
        ready = _ready(url, process)
        if ready:
            safe = {"model": "m", "messages": [{"role": "user", "content": "Say hello."}]}
            answered = httpx.post(f"{url}/v1/chat/completions", json=safe, timeout=10)
            unsafe = {"model": "m", "messages": [{"role": "user", "content": f"how to {UNSAFE}"}]}
            blocked = httpx.post(f"{url}/v1/chat/completions", json=unsafe, timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    log = log_path.read_text(encoding="utf-8")
    assert ready, f"the slim proxy did not become ready (exit status {process.returncode}):\n{log}"
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"]
    assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "content_filter"
    assert "Say hello." in guard.judged("input")[0] and UNSAFE in guard.judged("input")[-1]
    assert process.returncode in (0, -signal.SIGTERM) and "Traceback" not in log, log  # uvicorn re-raises it
    assert refused(tmp_path) == []  # not even an attempt that something caught


def test_policy_validate_check_and_decisions_need_no_embedded_extra(guard: ScriptedGuard, tmp_path: Path) -> None:
    validated = slim(tmp_path, "policy", "validate", str(ROOT / "policies" / "bank.yaml"))
    assert validated.returncode == 0 and "ok (bank" in validated.stdout, validated.stderr
    checked = slim(tmp_path, "check", f"how to {UNSAFE}", RSAFE_GUARD_URL=f"{guard.url}/v1")
    assert checked.returncode == 1 and "verdict:    unsafe" in checked.stdout, checked.stderr
    listed = slim(tmp_path, "decisions", "--last", "1")
    assert listed.returncode == 0, listed.stderr
    assert refused(tmp_path) == []


@pytest.mark.parametrize(
    "argv", [("check", "hello"), ("serve", "--port", "0"), ("train-head", "--data", "x", "--out", "y")]
)
def test_the_embedded_model_without_its_extra_is_one_clear_line(argv: tuple[str, ...], tmp_path: Path) -> None:
    started = time.monotonic()
    done = slim(tmp_path, *argv)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and EXTRA_LINE in lines[0] and INSTALL in lines[0], done.stderr
    assert "torch" in lines[0] and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30  # at once: nothing was loaded, no port was held


def test_a_postgresql_audit_log_without_its_extra_is_one_clear_line(tmp_path: Path) -> None:
    """`audit.url: postgresql://…` without psycopg stops `serve` before the port is bound, as a missing embedded
    extra does (not a traceback from the app's start, after the workers were started)."""
    done = slim(
        tmp_path,
        "serve",
        "--port",
        "0",
        RSAFE_GUARD_URL="http://127.0.0.1:9/v1",
        RSAFE_AUDIT_URL="postgresql://rsafe@127.0.0.1:9/rsafe",
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the 'postgres' extra" in lines[0], done.stderr
    assert "pip install 'rsafe-proxy[postgres]'" in lines[0] and "Traceback" not in done.stderr
