"""The real LiteLLM proxy, started with a config of examples/litellm/ as it is shipped: the files are copied to a
temporary folder (the Python guardrail's module next to its config, as its README says) and the addresses
reach them through the environment variables they read (`os.environ/...`).

LiteLLM runs from its own venv (`.ci/run` makes `.venv-litellm`, with rsafe-proxy installed in it); the
tests that need it are skipped with the reason when there is none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from rsafe_proxy.config import Settings
from tests.doubles import ScriptedGuard
from tests.fake_upstream import FakeUpstream
from tests.serving import Proxy, Servers, proxy_config, start_proxy, unused_url

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "litellm"
GUARDRAIL_MODULE = ROOT / "adapters" / "litellm" / "rsafe_guardrail.py"
LITELLM = os.environ.get("RSAFE_LITELLM") or str(ROOT / ".venv-litellm" / "bin" / "litellm")
MODEL = "gpt-4o-mini"  # the model name the example configs offer
MASTER_KEY = "sk-litellm-master"
TENANT_KEY = "sk-guardrail-tenant"  # the tenant's proxy key, given to the configs as RSAFE_PROXY_KEY


def tenant(policy: str | Path = "rsafe-default") -> dict[str, Any]:
    """The proxy's tenant that LiteLLM's calls belong to (by TENANT_KEY)."""
    digest = "sha256:" + hashlib.sha256(TENANT_KEY.encode()).hexdigest()
    return {"id": "litellm", "keys": [digest], "policy": str(policy)}


def _reset(double: Any) -> None:
    """A double's knobs and records as a new one has them (its address and lock kept)."""
    fresh = type(double)()
    for field in dataclasses.fields(double):
        if field.name not in ("url", "_lock"):
            setattr(double, field.name, getattr(fresh, field.name))


@dataclass
class Stack:
    """LiteLLM (at `url`) in front of the fake upstream, with the proxy and its scripted guard as its guardrail:
    started once for many tests (LiteLLM takes seconds to start), the doubles reset before each."""

    upstream: FakeUpstream
    guard: ScriptedGuard
    proxy: Proxy
    url: str

    def reset(self) -> Stack:
        """The stack as a test finds it: the doubles as new (the proxy caches no verdict, see litellm_stack)."""
        _reset(self.upstream)
        _reset(self.guard)
        return self


@contextmanager
def litellm_stack(config: str, directory: Path) -> Iterator[Stack]:
    """examples/litellm/`config` in the real LiteLLM, in front of its own doubles and proxy. The proxy keeps no
    verdict cache, so that each test sees the guard asked about what it sends."""
    servers = Servers()
    try:
        upstream, guard = FakeUpstream(), ScriptedGuard()
        upstream.url = servers.start(upstream.app, lifespan="off").url
        guard.url = servers.start(guard.app, lifespan="off").url
        settings = proxy_config(
            upstream.url, guard.url, directory, tenants=[tenant()], guard={"cache": {"max_entries": 0}}
        )
        proxy = start_proxy(servers, Settings.model_validate(settings))
        with running_litellm(example(config, directory), proxy.url, upstream) as url:
            yield Stack(upstream, guard, proxy, url)
    finally:
        servers.close()


def example(name: str, directory: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """examples/litellm/`name` copied into `directory` (changed by `edit`, if given), with the guardrail module
    beside it."""
    path = directory / name
    if edit is None:
        shutil.copy(EXAMPLES / name, path)
    else:
        config = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
        edit(config)
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
    shutil.copy(GUARDRAIL_MODULE, directory / GUARDRAIL_MODULE.name)
    return path


@contextmanager
def running_litellm(config: Path, proxy_url: str, upstream: FakeUpstream) -> Iterator[str]:
    """LiteLLM's proxy with `config`, in front of the fake upstream, with the RSafe Proxy at `proxy_url` as its
    guardrail; its URL."""
    if not Path(LITELLM).is_file():
        pytest.skip(f"no litellm executable at {LITELLM}: set RSAFE_LITELLM, or make .venv-litellm as .ci/run does")
    port = int(unused_url().rsplit(":", 1)[1])
    env = dict(
        os.environ,
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no download of the cost map at start
        LITELLM_MASTER_KEY=MASTER_KEY,
        RSAFE_PROXY_URL=proxy_url,
        RSAFE_PROXY_KEY=TENANT_KEY,
        UPSTREAM_BASE_URL=f"{upstream.url}/v1",
        UPSTREAM_API_KEY="sk-upstream",
    )
    command = [LITELLM, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    log_path = config.parent / "litellm.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=config.parent)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_live(url, process, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_live(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"litellm exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health/liveliness", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail("litellm did not start in 120 s")


def client(url: str) -> openai.OpenAI:
    """The OpenAI SDK pointed at LiteLLM, with LiteLLM's master key; no retries (each call is counted)."""
    return openai.OpenAI(base_url=url, api_key=MASTER_KEY, max_retries=0)


def streamed_text(url: str, prompt: str) -> tuple[str, list[str | None]]:
    """The text a streamed answer gives the client (an error ending it, as its message), and its finish reasons."""
    text = ""
    finish: list[str | None] = []
    try:
        with client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True
        ) as stream:
            for chunk in stream:
                text += "".join(choice.delta.content or "" for choice in chunk.choices)
                finish += [choice.finish_reason for choice in chunk.choices if choice.finish_reason]
    except openai.APIError as error:  # LiteLLM may end a stream with an error event
        text += f"[error: {error}]"
    return text, finish
