"""`rsafe-proxy serve --workers N`: N worker processes serving one listening socket.

The parent binds the socket (rsafe_proxy.server.bind) and checks the configuration once, then starts N workers
with multiprocessing's `spawn` start method: fresh interpreters, so no thread, lock or model state is copied by
`fork`. Each worker builds its own app and serves the inherited socket with rsafe_proxy.server.serve, so each
has the limits, drain and graceful shutdown of a single proxy; the kernel hands each new connection to one of
the workers waiting on the socket.

The parent forwards SIGTERM and SIGINT to every worker as SIGTERM and waits while they drain; it starts a new
worker when one dies while serving, and stops them all when one dies during start-up (the same error would
repeat). A worker whose parent disappears (SIGKILL) drains and stops by itself.

What the workers share: the socket; /metrics, through prometheus_client's multiprocess mode (a directory of
per-process files, PROMETHEUS_MULTIPROC_DIR, made here when the variable is unset), so that any worker answers a
scrape with every worker's figures; the audit log (SQLite in WAL mode with a busy timeout, or PostgreSQL); the
spans file (whole batches appended with one write each); the console's session secret (one random secret for all,
when none is configured). Everything else is per worker: see the README, "Scale-out"."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, cast

from pydantic import SecretStr

from rsafe_proxy.config import Settings
from rsafe_proxy.logs import LogFormat

log = logging.getLogger("rsafe_proxy")

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# A worker that ends this soon after it started failed to start: starting another would fail the same way.
START_UP_S = 10.0
# What the parent waits, beyond the drain's grace and uvicorn's own margin, before it kills a worker.
_STOP_MARGIN_S = 10.0
_PARENT_POLL_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process needs (pickled to it): the settings the parent checked, the listening socket,
    its number (1..N, in its log lines), the uvicorn options and how to log."""

    settings: Settings
    listener: socket.socket
    number: int
    options: Mapping[str, Any]
    log_format: LogFormat
    log_level: str


def _leave_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _stop_when_orphaned(parent: int) -> None:
    """SIGTERM this worker (a graceful drain) once its parent is gone: nobody would stop it otherwise."""
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def run_worker(spec: WorkerSpec) -> None:
    """A worker process's body: build the app from the settings and serve the inherited socket until SIGTERM."""
    from rsafe_proxy.app import build_app
    from rsafe_proxy.logs import configure
    from rsafe_proxy.server import serve

    # uvicorn restores these after its graceful shutdown and re-raises the signal it caught: end with status 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _leave_quietly)
    configure(spec.log_format, spec.log_level, worker=spec.number)
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    serve(spec.settings, build_app(spec.settings), listener=spec.listener, **spec.options)


def shared_session_secret(settings: Settings) -> Settings:
    """`settings` with one random console session secret when the console is on and none is set, so that every
    worker accepts the sessions the others signed (each would otherwise pick its own)."""
    console = settings.console
    if not console.enabled or console.session_secret is not None:
        return settings
    log.info("console: the workers share one random session secret (set console.session_secret to keep sign-ins)")
    shared = console.model_copy(update={"session_secret": SecretStr(secrets.token_urlsafe(32))})
    return settings.model_copy(update={"console": shared})


@contextlib.contextmanager
def metrics_directory() -> Iterator[str]:
    """The directory of prometheus_client's multiprocess mode, set in the environment the workers inherit: the
    one PROMETHEUS_MULTIPROC_DIR names (emptied of an earlier run's files), else a new one, removed at the end."""
    given = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):  # figures of processes that are gone would be added to the new ones
            if name.endswith(".db"):
                os.unlink(os.path.join(given, name))
        yield given
        return
    made = tempfile.mkdtemp(prefix="rsafe-metrics-")
    os.environ[MULTIPROCESS_DIR_VARIABLE] = made
    try:
        yield made
    finally:
        os.environ.pop(MULTIPROCESS_DIR_VARIABLE, None)
        shutil.rmtree(made, ignore_errors=True)


def _ending(exitcode: int | None) -> str:
    """How a process ended, in words (multiprocessing gives -N for a signal)."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


class Workers:
    """The parent of N worker processes: starts them, replaces one that dies while serving, stops them all."""

    def __init__(self, specs: list[WorkerSpec], metrics_dir: str) -> None:
        self._specs = specs
        self._metrics_dir = metrics_dir
        self._context = multiprocessing.get_context("spawn")
        self._running: dict[int, tuple[BaseProcess, float]] = {}  # worker number -> (process, start time)
        self._stop: list[int] = []  # signals received (a list: appending is all a signal handler does)
        grace = specs[0].settings.server.shutdown_grace_s if specs else 0.0
        self._stop_wait_s = grace + _STOP_MARGIN_S + 5.0

    def _start(self, spec: WorkerSpec) -> None:
        process = self._context.Process(target=run_worker, args=(spec,), name=f"rsafe-proxy worker {spec.number}")
        process.start()
        self._running[spec.number] = (process, time.monotonic())
        log.info("worker %d started (pid %s)", spec.number, process.pid)

    def _ended(self, number: int) -> bool:
        """A worker ended on its own; True when it is replaced, False when everything must stop."""
        process, started = self._running.pop(number)
        process.join(5)  # its sentinel is ready: this reaps it and sets its exit code
        self._forget(process)
        lived = time.monotonic() - started
        if lived < START_UP_S:
            log.error(
                "worker %d (pid %s) stopped %.1f s after it started (%s): stopping every worker",
                number,
                process.pid,
                lived,
                _ending(process.exitcode),
            )
            return False
        log.warning("worker %d (pid %s) died (%s); starting another", number, process.pid, _ending(process.exitcode))
        self._start(self._specs[number - 1])
        return True

    def _forget(self, process: BaseProcess) -> None:
        """Drop a dead worker's live gauges (requests in flight...) from /metrics; its counters stay counted."""
        from prometheus_client import multiprocess

        if process.pid is not None:
            multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT (then drain and stop every worker); the exit status."""
        previous = {signum: signal.signal(signum, lambda s, _: self._stop.append(s)) for signum in _STOP_SIGNALS}
        status = 0
        try:
            for spec in self._specs:
                self._start(spec)
            while not self._stop:
                by_sentinel = {process.sentinel: number for number, (process, _) in self._running.items()}
                for sentinel in wait(list(by_sentinel), timeout=0.5):
                    if not self._stop and not self._ended(by_sentinel[cast(int, sentinel)]):
                        status = 1
                        self._stop.append(signal.SIGTERM)
                        break
            if self._stop and status == 0:
                log.info("stopping %d workers (each drains its requests first)", len(self._running))
        finally:
            self._stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return status

    def _stop_all(self) -> None:
        for process, _ in self._running.values():
            if process.exitcode is None and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_wait_s
        for process, _ in self._running.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("worker pid %s did not stop in time: killed", process.pid)
                process.kill()
                process.join()
            self._forget(process)
        self._running.clear()


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def serve_workers(
    settings: Settings,
    listener: socket.socket,
    count: int,
    options: Mapping[str, Any],
    log_format: LogFormat = "text",
    log_level: str = "info",
) -> int:
    """Serve with `count` worker processes on `listener` until SIGTERM or SIGINT; the exit status."""
    from rsafe_proxy.server import url_of

    settings = shared_session_secret(settings)
    with metrics_directory() as directory:
        specs = [WorkerSpec(settings, listener, n, options, log_format, log_level) for n in range(1, count + 1)]
        log.info("serving %s with %d worker processes (parent pid %d)", url_of(listener), count, os.getpid())
        return Workers(specs, directory).run()
