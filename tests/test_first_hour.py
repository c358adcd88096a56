"""The first hour of a new user, driven as they drive it: the `rsafe-proxy` console script in a subprocess, a
proxy served by `rsafe-proxy serve`, the README and the files shipped beside the code (issue 16)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from rsafe_proxy.cli import parser
from rsafe_proxy.config import Settings
from rsafe_proxy.configdoc import keys, render
from rsafe_proxy.policy.jsonschema import DIALECT, SCHEMA_ID, SCHEMA_LINE, packaged_schema_path, schema_text
from rsafe_proxy.policy.loading import load_policy
from tests.conftest import MakeProxy
from tests.doubles import UNSAFE, ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import proxy_config, unused_url

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("rsafe-proxy")
SLOW_START = "tests.doubles:SlowStartEngine"


def rsafe(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`rsafe-proxy ARGV…` as a user runs it (the installed console script), from the repository root."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "rsafe_proxy.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # so that a configured engine may be tests.doubles:…
    return subprocess.run(
        [*command, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False
    )


def write_config(directory: Path, upstream_url: str, guard: dict[str, Any]) -> Path:
    config = proxy_config(upstream_url, "http://unused", directory, guard=guard)
    config["guard"] = guard  # replaced whole: only what the test names
    path = directory / "proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def scripted(guard: ScriptedGuard) -> dict[str, Any]:
    return {"engine": "openai", "url": f"{guard.url}/v1", "model": "scripted-guard", "timeout_s": 2}


# -- check: an exit status a script can gate on, and the verdict's own latency ---------------------------


def test_check_exits_0_safe_1_unsafe_2_error(guard: ScriptedGuard, tmp_path: Path) -> None:
    config = str(write_config(tmp_path, unused_url(), scripted(guard)))
    safe = rsafe("--config", config, "check", "hello there")
    unsafe = rsafe("--config", config, "check", f"how to {UNSAFE}")
    assert (safe.returncode, unsafe.returncode) == (0, 1), (safe.stderr, unsafe.stderr)
    assert "verdict:    safe" in safe.stdout and "verdict:    unsafe" in unsafe.stdout

    dead = str(write_config(tmp_path, unused_url(), {**scripted(guard), "url": f"{unused_url()}/v1"}))
    error = rsafe("--config", dead, "check", "--json", "hello there")
    assert error.returncode == 2
    result = json.loads(error.stdout)
    assert result["verdict"] == "unknown" and result["error"]

    broken = tmp_path / "broken.yaml"
    broken.write_text("guard: {mode: sideways}\n", encoding="utf-8")
    invalid = rsafe("--config", str(broken), "check", "hello")
    assert invalid.returncode == 2 and "broken.yaml:1" in invalid.stderr and "Traceback" not in invalid.stderr


def test_check_times_the_verdict_apart_from_the_model_load(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, unused_url(), {"engine": SLOW_START, "options": {"load_s": 1.5}}))
    done = rsafe("--config", config, "check", "--json", f"how to {UNSAFE}")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["load_seconds"] >= 1.5
    assert result["seconds"] < 1.0  # the verdict's latency: the load is not in it
    text = rsafe("--config", config, "check", "hello")
    assert text.returncode == 0
    assert re.search(r"verdict in \d+\.\d\d s\s+\(model load 1\.\d\d s, not counted\)", text.stdout), text.stdout


# -- the command line: --version, help on every argument, the README's list ------------------------------


def _commands(top: argparse.ArgumentParser) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    def walk(
        command: argparse.ArgumentParser, path: tuple[str, ...]
    ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
        subcommands = [action for action in command._actions if isinstance(action, argparse._SubParsersAction)]
        yield path, command
        for action in subcommands:
            for name, child in action.choices.items():
                yield from walk(child, (*path, name))

    return walk(top, ())


def _options(command: argparse.ArgumentParser) -> set[str]:
    return {
        action.option_strings[-1]
        for action in command._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
    }


def test_version_and_help_for_every_argument() -> None:
    from importlib import metadata

    done = rsafe("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"rsafe-proxy {metadata.version('rsafe-proxy')}"
    missing = [
        f"{' '.join(path) or 'rsafe-proxy'} {action.option_strings or action.dest}"
        for path, command in _commands(parser())
        for action in command._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert missing == []
    assert "describe" not in rsafe("policy", "--help").stdout  # nothing promised that does not exist


def _readme_commands() -> dict[tuple[str, ...], str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    top, lines = parser(), {}
    for line in block.splitlines():
        if not line.startswith("rsafe-proxy "):
            continue
        command, path = top, []
        for word in line.split()[1:]:
            children = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
            if not children or word not in children[0].choices:
                break
            command = children[0].choices[word]
            path.append(word)
        lines[tuple(path)] = line
    return lines


def test_the_readme_command_list_is_the_parser() -> None:
    listed = _readme_commands()
    commands = {path: command for path, command in _commands(parser())}
    leaves = {
        path
        for path, command in commands.items()
        if not any(isinstance(action, argparse._SubParsersAction) for action in command._actions)
    }
    assert leaves <= set(listed), f"commands missing from the README: {leaves - set(listed)}"
    for path, line in listed.items():
        assert path in commands, f"the README lists {path}, which does not exist"
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
        options = _options(commands[path]) - {"--config"}
        assert named - {"--config", "--help", "--version"} <= options, f"{path}: not options: {named - options}"
        if "--help" not in line:  # a line may list the usual options and point at --help for the rest
            assert options <= named, f"{path}: options missing from the README: {options - named}"


def test_the_readmes_test_command_says_what_to_install() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    test_section = readme.split("## Test", 1)[1].split("\n## ", 1)[0]
    assert '-e ".[dev,embedded]"' in test_section and "python -m pytest" in test_section
    assert "../shared/datasets" not in readme.split("## Set up", 1)[1].split("\n## ", 1)[0]


# -- serve: the port first, then the truth about the guard -------------------------------------------------


def test_serve_fails_fast_and_clearly_when_the_port_is_taken(guard: ScriptedGuard, tmp_path: Path) -> None:
    config = str(write_config(tmp_path, unused_url(), scripted(guard)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = rsafe("--config", config, "serve", "--port", str(port), timeout=30)
        took = time.monotonic() - started
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in done.stderr
    assert "Application startup complete" not in done.stderr and "Traceback" not in done.stderr
    assert took < 10


class Served:
    """`rsafe-proxy serve` in a subprocess; its log lines collected as they come."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process, self.url, self.lines = process, url, list[str]()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, words: str, timeout: float = 30) -> dict[str, Any]:
        """The first JSON log line whose message holds `words` (waiting for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # not a log line (the test below fails on anything unexpected)
                if isinstance(record, dict) and words in str(record.get("message")):
                    return record
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line with {words!r}; the log:\n" + "\n".join(self.lines))


@contextmanager
def served(config: Path) -> Iterator[Served]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "rsafe_proxy.cli"]
    argv = [*command, "--config", str(config), "serve", "--port", str(port), "--log-format", "json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    try:
        yield Served(process, f"http://127.0.0.1:{port}")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_serve_says_when_the_guard_loads_and_is_ready_and_logs_each_block(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    config = write_config(tmp_path, upstream.url, {"engine": SLOW_START, "options": {"load_s": 1.0}})
    with served(config) as proxy:
        address = proxy.wait_for("serving http://")
        assert address["message"].startswith(f"serving {proxy.url} (pid ")
        loading = proxy.wait_for("guard loading")
        ready = proxy.wait_for("guard ready")
        assert "engine tests.doubles:SlowStartEngine" in loading["message"] and "mode generate" in loading["message"]
        assert re.search(r"loaded in 1\.\d s", ready["message"])
        assert proxy.wait_for("upstream")["message"].endswith("can be reached")
        assert httpx.get(f"{proxy.url}/readyz").json()["upstream"]["reachable"] is True

        body = {"model": "m", "messages": [{"role": "user", "content": f"secret words {UNSAFE}"}]}
        blocked = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=10)
        assert blocked.status_code == 400
        decision_id = blocked.headers["x-rsafe-decision-id"]
        line = proxy.wait_for(f"decision {decision_id}")
    assert line["level"] == "info" and line["logger"] == "rsafe_proxy.decisions"
    assert line["decision"]["tenant"] == "default"
    assert (line["decision"]["side"], line["decision"]["action"]) == ("input", "block")
    assert line["decision"]["decision_id"] == decision_id
    log = "\n".join(proxy.lines)
    assert "secret words" not in log and UNSAFE not in log  # never the content
    # the upstream and guard calls made no line of their own (an HTTP client's line per call would bury the rest)
    assert not [line for line in proxy.lines if json.loads(line)["logger"].startswith(("httpx", "httpcore", "aiohttp"))]
    assert "Traceback" not in log and "Warning" not in log and "\x1b[" not in log  # no terminal colours in JSON
    assert all(json.loads(line) for line in proxy.lines)  # every line is one JSON object


# -- the upstream: named, with the cause, at start-up and in /readyz --------------------------------------


def test_an_unreachable_upstream_is_named_with_its_cause(make_proxy: MakeProxy) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    dead = unused_url()
    refused = make_proxy(upstream={"base_url": f"{dead}/v1"})
    answer = httpx.post(f"{refused.url}/v1/chat/completions", json=body, timeout=10)
    message = answer.json()["error"]["message"]
    assert answer.status_code == 502
    assert f"{dead.removeprefix('http://')}" in message and "refused" in message
    ready = httpx.get(f"{refused.url}/readyz")
    assert ready.status_code == 200  # reported, not required: the guard and policies make the proxy ready
    assert ready.json()["upstream"]["reachable"] is False and "refused" in ready.json()["upstream"]["error"]

    unknown = make_proxy(upstream={"base_url": "http://no-such-host.invalid/v1"})
    message = httpx.post(f"{unknown.url}/v1/chat/completions", json=body, timeout=10).json()["error"]["message"]
    assert "no-such-host.invalid:80" in message and "DNS" in message


def test_a_tls_failure_is_named_as_such(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    plain = upstream.url.replace("http://", "https://")  # TLS spoken to a plain HTTP server
    proxy = make_proxy(upstream={"base_url": f"{plain}/v1"})
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    message = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=10).json()["error"]["message"]
    assert "TLS" in message, message
    assert "TLS" in httpx.get(f"{proxy.url}/readyz").json()["upstream"]["error"]


def test_start_up_warns_of_an_unreachable_upstream_but_serves(tmp_path: Path) -> None:
    config = write_config(tmp_path, unused_url(), {"engine": SLOW_START, "options": {"load_s": 0.1}})
    with served(config) as proxy:
        warning = proxy.wait_for("cannot be reached")
        assert warning["level"] == "warning" and "refused" in warning["message"]
        proxy.wait_for("guard ready")
        assert httpx.get(f"{proxy.url}/healthz").status_code == 200  # still serving


# -- policy test: progress and whole words ------------------------------------------------------------------


def test_policy_test_says_it_is_loading_and_marks_cut_texts(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, unused_url(), {"engine": SLOW_START, "options": {"load_s": 0.5}}))
    long_text = "a harmless sentence that goes on and on about gardens, " * 3
    policy = tmp_path / "garden.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "id": "garden",
                "categories": [{"id": "U1", "name": "Violence"}],
                "examples": [{"text": long_text, "expected": "safe"}],
            }
        ),
        encoding="utf-8",
    )
    done = rsafe("--config", config, "policy", "test", str(policy))
    assert done.returncode == 0, done.stderr
    assert "loading the guard model" in done.stderr and "guard ready in" in done.stderr
    row = done.stdout.splitlines()[1]
    assert row.endswith("…") and len(row.split("  ")[-1].strip()) <= 70


# -- files a user and a compliance officer need ---------------------------------------------------------


def test_the_configuration_reference_is_the_settings_model() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: python -m rsafe_proxy.configdoc > docs/configuration.md"
    )
    documented = {key: meaning for key, _, _, meaning in keys()}
    assert [key for key, meaning in documented.items() if not meaning] == []
    packaged = yaml.safe_load((ROOT / "rsafe_proxy" / "proxy.yaml").read_text(encoding="utf-8"))

    def paths(value: Any, prefix: str) -> Iterator[str]:
        if isinstance(value, dict):
            for key, item in value.items():
                yield f"{prefix}{key}"
                if key != "options":
                    yield from paths(item, f"{prefix}{key}.")
        elif isinstance(value, list):
            for item in value:
                yield from paths(item, prefix[:-1] + "[].")

    assert set(paths(packaged, "")) <= set(documented)
    assert set(Settings.model_fields) - {"source"} <= set(documented)


def test_the_license_is_the_apache_license() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_the_policy_schema_ships_and_every_example_policy_names_it(tmp_path: Path) -> None:
    schema = json.loads(schema_text())
    assert (schema["$schema"], schema["$id"]) == (DIALECT, SCHEMA_ID)
    assert packaged_schema_path().read_text(encoding="utf-8") == schema_text()
    out = tmp_path / "policy.schema.json"
    done = rsafe("policy", "schema", "--output", str(out))
    assert done.returncode == 0 and out.read_text(encoding="utf-8") == schema_text()
    assert rsafe("policy", "schema").stdout == schema_text()
    for folder in (ROOT / "policies", ROOT / "rsafe_proxy" / "policies"):
        assert (folder / "policy.schema.json").read_text(encoding="utf-8") == schema_text(), folder
        for file in sorted(folder.glob("*.yaml")):
            content = file.read_text(encoding="utf-8")
            assert content.splitlines()[0] == SCHEMA_LINE, file
            bare = tmp_path / file.name
            bare.write_text(content.split("\n", 1)[1], encoding="utf-8")
            assert load_policy(bare).version == load_policy(file).version  # the line is a comment
