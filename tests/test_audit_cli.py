"""`rsafe-proxy decisions` over a real SQLite audit log: the filters, the table (header row, local time with its
zone), --reasoning, --json, --follow, an empty answer, bad input, and `| head` (run as the user runs it, in a
subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rsafe_proxy.audit.command import moment
from rsafe_proxy.audit.record import DecisionRecord
from rsafe_proxy.audit.sqlite import SqliteStore
from rsafe_proxy.cli import main

NOON_UTC = datetime(2025, 6, 1, 12, 0, tzinfo=UTC).timestamp()


def decision(number: int, at: float, **fields: object) -> DecisionRecord:
    values: dict[str, object] = {
        "decision_id": f"{number:032x}",
        "seq": 0,
        "time": at,
        "tenant": "bank" if number % 2 else "shop",
        "route": "/v1/chat/completions",
        "side": "input",
        "verdict": "unsafe" if number % 3 == 0 else "safe",
        "score": None,
        "categories": ("U2",) if number % 3 == 0 else (),
        "action": "block" if number % 3 == 0 else "allow",
        "policy_id": "bank-policy",
        "policy_version": "v1" if number < 4 else "v2",
        "engine": "openai",
        "latency_ms": 4.0,
        "cache_hit": False,
        "reasoning": f"reasoning of {number}\nsecond line" if number % 3 == 0 else None,
    }
    values.update(fields)
    return DecisionRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def audit(tmp_path: Path) -> Path:
    """An audit log holding 8 decisions an hour apart, the last one 30 minutes ago."""
    path = tmp_path / "decisions.db"
    now = time.time()
    store = SqliteStore(path)
    store.write([decision(number, now - 1800 - (7 - number) * 3600) for number in range(8)])
    store.close()
    return path


def run(capsys: pytest.CaptureFixture[str], audit: Path, *args: str) -> tuple[int, list[str], str]:
    code = main(["decisions", "--url", str(audit), *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def ids(lines: list[str]) -> list[int]:
    return [int(json.loads(line)["decision_id"], 16) for line in lines]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), [0, 1, 2, 3, 4, 5, 6, 7]),  # oldest first, the latest at the bottom
        (("--last", "3"), [5, 6, 7]),
        (("--tenant", "bank"), [1, 3, 5, 7]),
        (("--verdict", "unsafe"), [0, 3, 6]),
        (("--action", "block", "--tenant", "shop"), [0, 6]),
        (("--category", "U2"), [0, 3, 6]),
        (("--category", "U"), []),
        (("--side", "output"), []),
        (("--policy-version", "bank-policy@v2"), [4, 5, 6, 7]),
        (("--policy-version", "v1"), [0, 1, 2, 3]),
        (("--since", "3h"), [5, 6, 7]),  # 2.5 h, 1.5 h and 0.5 h ago
        (("--since", "4h", "--until", "1h"), [4, 5, 6]),
        (("--id", f"{5:032x}"), [5]),
        (("--last", "9" * 20), [0, 1, 2, 3, 4, 5, 6, 7]),  # more than any database counts: all of them
    ],
)
def test_the_filters(
    capsys: pytest.CaptureFixture[str], audit: Path, args: tuple[str, ...], expected: list[int]
) -> None:
    code, lines, err = run(capsys, audit, *args, "--json")
    assert code == 0
    assert ids(lines) == expected
    assert (err.strip() == "no decisions match") == (expected == [])


def test_a_table_with_a_header_and_the_reasoning(capsys: pytest.CaptureFixture[str], audit: Path) -> None:
    code, lines, _ = run(capsys, audit, "--verdict", "unsafe", "--reasoning")
    assert code == 0
    assert lines[0].split() == [
        "TIME", "TENANT", "SIDE", "VERDICT", "ACTION", "CATEGORIES", "SCORE", "DECISION", "ID", "POLICY",
    ]  # fmt: skip
    rows = lines[1::3]
    assert [row.split()[3:7] for row in rows] == [
        ["shop", "input", "unsafe", "block"],
        ["bank", "input", "unsafe", "block"],
        ["shop", "input", "unsafe", "block"],
    ]
    assert lines[2].strip() == "reasoning: reasoning of 0"
    assert lines[3].strip() == "second line"


def test_control_characters_from_the_log_never_reach_the_terminal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # the guard's reasoning may quote a prompt: an escape sequence in it must not drive the reader's terminal
    path = tmp_path / "decisions.db"
    store = SqliteStore(path)
    hostile = "\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\x1b[1A\rfake line\x9b31m"
    store.write([decision(3, NOON_UTC, reasoning=f"quoted {hostile}\nnext", categories=("U2\x1b[8m",))])
    store.close()
    code, lines, _ = run(capsys, path, "--reasoning")
    assert code == 0
    assert not any(char in line for line in lines for char in "\x1b\x07\r\x9b")
    assert "\\x1b]52;c;cm0gLXJmIH4=" in lines[2]
    assert lines[3].strip() == "next"


def test_times_are_local_with_their_zone(tmp_path: Path) -> None:
    path = tmp_path / "decisions.db"
    store = SqliteStore(path)
    store.write([decision(1, NOON_UTC)])
    store.close()
    done = subprocess.run(
        [sys.executable, "-m", "rsafe_proxy.cli", "decisions", "--url", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TZ": "Asia/Kolkata"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith("2025-06-01 17:30:00 +0530  bank")


def test_no_match_and_no_audit_log_yet_are_not_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, lines, err = run(capsys, tmp_path / "never-written.db")
    assert (code, lines) == (0, [])
    assert err.startswith("no decisions match (no audit log yet at ")
    assert not (tmp_path / "never-written.db").exists()  # reading makes no file


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "yesterday"), "'yesterday' is neither an age (30m, 2h, 7d) nor an ISO 8601 time"),
        (("--last", "0"), "must be a whole number of at least 1"),
        (("--verdict", "bad"), "invalid choice: 'bad'"),
    ],
)
def test_bad_arguments_are_told_plainly(
    capsys: pytest.CaptureFixture[str], audit: Path, args: tuple[str, ...], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["decisions", "--url", str(audit), *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unreadable_audit_log_is_an_error_without_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "decisions.db"
    path.write_bytes(b"this is not a database, just bytes " * 100)
    code, lines, err = run(capsys, path)
    assert (code, lines) == (2, [])
    assert err.startswith(f"rsafe-proxy: cannot read the audit log at {path}: ")
    assert "Traceback" not in err


def test_iso_times_with_and_without_a_zone() -> None:
    assert moment("2025-06-01T12:00:00+00:00") == NOON_UTC
    assert moment("2025-06-01T14:00:00+02:00") == NOON_UTC
    assert moment("2025-06-01") == datetime(2025, 6, 1).astimezone().timestamp()  # no zone: local
    assert abs(moment("2h") - (time.time() - 7200)) < 5
    assert abs(moment("7d") - (time.time() - 7 * 86_400)) < 5


def test_piped_into_head_it_ends_quietly(tmp_path: Path) -> None:
    path = tmp_path / "decisions.db"
    store = SqliteStore(path)
    store.write([decision(number, NOON_UTC + number) for number in range(3000)])  # far more than a pipe holds
    store.close()
    command = f"{sys.executable} -m rsafe_proxy.cli decisions --url {path} --last 3000 | head -n 2"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert len(done.stdout.splitlines()) == 2


def test_follow_prints_only_what_is_written_after_it_starts(tmp_path: Path) -> None:
    path = tmp_path / "decisions.db"
    now = time.time()
    store = SqliteStore(path)
    store.write([decision(number, now - 10 + number) for number in range(5)])  # all within the last 10 s
    store.close()
    follower = subprocess.Popen(
        [sys.executable, "-m", "rsafe_proxy.cli", "decisions", "--url", str(path), "--follow", "--json", "--last", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while len(lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.5)  # two polls at least
        store = SqliteStore(path)
        store.write([decision(9, time.time())])
        store.close()
        while len(lines) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)
        assert ids(lines) == [3, 4, 9]  # not the older ones --last left out
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_follow_prints_decisions_as_they_are_written(audit: Path) -> None:
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rsafe_proxy.cli",
            "decisions",
            "--url",
            str(audit),
            "--follow",
            "--json",
            "--last",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ids(lines) == [7]
        store = SqliteStore(audit)
        # a decision made earlier than the latest shown, written late (another worker's batch), and a new one
        store.write([decision(8, time.time() - 1805), decision(9, time.time())])
        store.close()
        while len(lines) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(ids(lines)) == [7, 8, 9]
    finally:
        follower.terminate()
        follower.wait(timeout=10)
