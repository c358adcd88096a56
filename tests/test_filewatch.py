"""One watch rule for policy files and proxy.yaml: a changed file is read once it is unchanged for one poll."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml

from rsafe_proxy.config import load_settings
from rsafe_proxy.filewatch import FileWatch
from rsafe_proxy.policy.tenancy import Tenancy, TenancyWatch


def edit(path: Path, text: str) -> None:
    """Write `text` and move the file's mtime on, so that the edit is seen even on a coarse clock."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


@pytest.fixture
def watched(tmp_path: Path) -> Path:
    path = tmp_path / "watched.yaml"
    path.write_text("a: 1\n", encoding="utf-8")
    return path


def test_an_unchanged_file_is_never_reported(watched: Path) -> None:
    files = FileWatch([watched])
    assert [files.settled() for _ in range(3)] == [[], [], []]


def test_a_changed_file_is_reported_once_after_one_quiet_poll(watched: Path) -> None:
    files = FileWatch([watched])
    edit(watched, "a: 2\n")
    assert files.settled() == []  # seen changing
    assert files.settled() == [watched]  # unchanged since: settled
    assert files.settled() == []  # taken as read


def test_a_file_still_being_written_waits_until_it_settles(watched: Path) -> None:
    files = FileWatch([watched])
    edit(watched, "a: 2\n")
    assert files.settled() == []
    edit(watched, "a: 2\nb: 3\n")
    assert files.settled() == []  # changed again since the last poll
    assert files.settled() == [watched]


def test_an_edit_undone_before_it_settles_is_not_reported(watched: Path) -> None:
    files = FileWatch([watched])
    original = watched.stat()
    edit(watched, "a: 2\n")
    assert files.settled() == []
    watched.write_text("a: 1\n", encoding="utf-8")
    os.utime(watched, ns=(original.st_atime_ns, original.st_mtime_ns))
    assert files.settled() == []
    assert files.settled() == []


def test_a_deleted_file_is_reported_once_then_its_return(watched: Path) -> None:
    files = FileWatch([watched])
    watched.unlink()
    assert files.settled() == []
    assert files.settled() == [watched]
    assert files.settled() == []
    edit(watched, "a: 3\n")
    assert files.settled() == []
    assert files.settled() == [watched]


def test_follow_adds_new_files_as_read_and_drops_the_others(watched: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("b: 1\n", encoding="utf-8")
    files = FileWatch([watched])
    edit(watched, "a: 2\n")
    assert files.settled() == []
    files.follow([watched, other])  # `watched` keeps its state: it settles on the next poll
    assert files.settled() == [watched]
    files.follow([other])
    edit(watched, "a: 3\n")
    edit(other, "b: 2\n")
    assert files.settled() == []
    assert files.settled() == [other]


def _digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _config(tenants: list[str]) -> str:
    entries = [{"id": name, "keys": [_digest(f"sk-{name}")], "policy": "rsafe-default"} for name in tenants]
    return yaml.safe_dump({"guard": {"engine": "openai", "url": "http://127.0.0.1:9/v1"}, "tenants": entries})


def test_proxy_yaml_follows_the_same_rule_as_policy_files(tmp_path: Path) -> None:
    source = tmp_path / "proxy.yaml"
    source.write_text(_config(["a", "b"]), encoding="utf-8")
    settings = load_settings(source)
    tenancy = Tenancy.load(settings, {})
    watch = TenancyWatch(settings.source, tenancy, {})
    assert watch.poll(tenancy) is None

    # an editor caught half-way: the file holds a valid proxy.yaml with tenant b only
    edit(source, _config(["b"]))
    assert watch.poll(tenancy) is None
    edit(source, _config(["a", "b", "c"]))
    assert watch.poll(tenancy) is None  # changed since the last poll: not read yet
    reload = watch.poll(tenancy)
    assert reload is not None
    assert (reload.replaced, reload.reloaded, reload.rejected) == (("a", "b", "c"), 1, 0)
    assert reload.tenancy.directory.resolve("Bearer sk-c").id == "c"
    assert sorted(reload.tenancy.policies.entries) == ["a", "b", "c"]
    assert tenancy.directory.resolve("Bearer sk-a").id == "a"  # the old snapshot is untouched
    assert "c" not in tenancy.policies.entries


def test_a_rejected_proxy_yaml_keeps_the_snapshot_and_says_why(tmp_path: Path) -> None:
    source = tmp_path / "proxy.yaml"
    source.write_text(_config(["a"]), encoding="utf-8")
    settings = load_settings(source)
    tenancy = Tenancy.load(settings, {})
    watch = TenancyWatch(settings.source, tenancy, {})
    edit(source, _config(["a"]) + "unknown_section: 1\n")
    assert watch.poll(tenancy) is None
    reload = watch.poll(tenancy)
    assert reload is not None and reload.rejected == 1 and reload.reloaded == 0
    assert reload.tenancy.directory is tenancy.directory
    assert reload.tenancy.config_error is not None and "unknown_section" in reload.tenancy.config_error

    edit(source, _config(["a"]))
    assert watch.poll(reload.tenancy) is None
    fixed = watch.poll(reload.tenancy)
    assert fixed is not None and fixed.tenancy.config_error is None
