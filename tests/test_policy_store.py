"""PolicyStore: hot reload of policy files (watched by FileWatch, as the runtime does); a bad edit is rejected and
the last good version keeps serving."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from rsafe_proxy.filewatch import FileWatch
from rsafe_proxy.policy.schema import Action, Policy
from rsafe_proxy.policy.store import PolicyStore
from rsafe_proxy.yamlsource import FileInvalid

GOOD = """\
id: shop
categories:
  - {id: S1, name: Competitor Mentions, action: rewrite, side: output}
  - {id: S2, name: Profanity, action: flag}
"""


def edit(path: Path, text: str) -> None:
    """Write `text` and move the file's mtime on, so that the edit is seen even on a coarse clock."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


class Watched:
    """A store and the watch of its files, polled as the runtime's watcher polls them: each poll swaps the store."""

    def __init__(self, store: PolicyStore) -> None:
        self.store = store
        self.files = FileWatch(store.paths())

    def reload_changed(self) -> list[str]:
        reload = self.store.reloaded(self.files.settled())
        assert reload.store.reload_errors == self.store.reload_errors + reload.rejected
        self.store = reload.store
        return list(reload.replaced)

    def get(self, tenant: str) -> Policy:
        return self.store.get(tenant)

    def errors(self) -> dict[str, str]:
        return self.store.errors()

    @property
    def reload_errors(self) -> int:
        return self.store.reload_errors


def reload(store: Watched) -> list[str]:
    """Two polls: the first sees the change, the second reads the file that stayed unchanged since."""
    assert store.reload_changed() == []
    return store.reload_changed()


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "shop.yaml"
    path.write_text(GOOD, encoding="utf-8")
    return path


@pytest.fixture
def store(policy_file: Path, tmp_path: Path) -> Watched:
    other = tmp_path / "other.yaml"
    other.write_text("id: other\ncategories: [{id: U1, name: Violence}]\n", encoding="utf-8")
    return Watched(PolicyStore.load({"shop": policy_file, "other": other}))


def test_each_tenant_gets_its_policy(store: Watched) -> None:
    assert (store.get("shop").id, store.get("other").id) == ("shop", "other")
    assert store.errors() == {}
    assert store.reload_changed() == []


def test_a_valid_edit_is_picked_up_with_a_new_version(store: Watched, policy_file: Path) -> None:
    serving = store.get("shop")
    edit(policy_file, GOOD.replace("action: flag", "action: block"))

    assert reload(store) == ["shop"]
    assert store.get("shop").version != serving.version
    assert store.get("shop").categories[1].action is Action.BLOCK
    # a request that took the old policy keeps it unchanged until it ends
    assert serving.categories[1].action is Action.FLAG
    assert store.reload_changed() == []


def test_an_edit_that_changes_nothing_keeps_the_version(store: Watched, policy_file: Path) -> None:
    version = store.get("shop").version
    edit(policy_file, "# reviewed by legal\n" + GOOD)
    assert reload(store) == []
    assert store.get("shop").version == version
    assert store.errors() == {}


def test_an_invalid_edit_is_rejected_and_the_last_good_version_serves(
    store: Watched, policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = store.get("shop")
    broken = GOOD.replace("action: flag", "action: maybe")
    edit(policy_file, broken)

    with caplog.at_level(logging.ERROR, logger="rsafe_proxy.policy"):
        assert reload(store) == []
    assert store.get("shop") is good
    assert store.reload_errors == 1
    errors = store.errors()
    assert list(errors) == ["shop"]
    problem = f"{policy_file}:4: categories[S2].action must be one of: flag, rewrite, block (got 'maybe')"
    assert problem in errors["shop"]
    assert f"keeps version {good.version}" in caplog.text

    # not reported again while the file stays as it is
    assert store.reload_changed() == []
    assert store.reload_errors == 1

    edit(policy_file, GOOD.replace("action: flag", "action: block"))
    assert reload(store) == ["shop"]
    assert store.errors() == {}
    assert store.get("shop").categories[1].action is Action.BLOCK


def test_fixing_an_edit_back_to_the_serving_version_clears_the_error(store: Watched, policy_file: Path) -> None:
    version = store.get("shop").version
    edit(policy_file, "id: shop\ncategories: [")
    reload(store)
    assert "not valid YAML" in store.errors()["shop"]
    edit(policy_file, GOOD)
    assert reload(store) == []
    assert store.errors() == {}
    assert store.get("shop").version == version


def test_a_deleted_file_keeps_the_last_good_version(store: Watched, policy_file: Path) -> None:
    version = store.get("shop").version
    policy_file.unlink()
    assert reload(store) == []
    assert "cannot read the file" in store.errors()["shop"]
    assert store.get("shop").version == version
    edit(policy_file, GOOD)
    reload(store)
    assert store.errors() == {}


def test_a_file_replaced_by_rename_is_picked_up(store: Watched, policy_file: Path, tmp_path: Path) -> None:
    # editors save by writing a new file and renaming it over the old one
    stat = policy_file.stat()
    replacement = tmp_path / "shop.yaml.swp"
    replacement.write_text(GOOD.replace("action: flag", "action: bloc"), encoding="utf-8")  # same size
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replacement.replace(policy_file)
    reload(store)
    assert "shop" in store.errors()


def test_a_file_is_read_only_once_it_has_stopped_changing(store: Watched, policy_file: Path) -> None:
    # an editor caught half-way: the first lines alone are a valid policy that would flag nothing
    edit(policy_file, GOOD.split("  - {id: S2")[0])
    assert store.reload_changed() == []
    edit(policy_file, GOOD.replace("action: flag", "action: block"))
    assert store.reload_changed() == []
    assert store.get("shop").categories[1].action is Action.FLAG
    assert store.reload_changed() == ["shop"]
    assert store.get("shop").categories[1].action is Action.BLOCK


def test_start_up_stops_on_every_bad_policy(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("id: a\ncategories: []\n", encoding="utf-8")
    second.write_text("id: b\ncategories: [{id: U1}]\n", encoding="utf-8")
    with pytest.raises(FileInvalid) as raised:
        PolicyStore.load({"a": first, "b": second, "c": tmp_path / "missing.yaml"})
    assert [(Path(problem.path).name, problem.line) for problem in raised.value.problems] == [
        ("a.yaml", 2),
        ("b.yaml", 2),
        ("missing.yaml", None),
    ]


def test_a_reload_leaves_the_store_a_request_holds_unchanged(store: Watched, policy_file: Path) -> None:
    held = store.store  # what a request read at its start
    edit(policy_file, GOOD.replace("action: flag", "action: block"))
    assert reload(store) == ["shop"]
    assert held.get("shop").categories[1].action is Action.FLAG
    assert store.store is not held
    with pytest.raises(TypeError):
        held.entries["shop"] = held.entries["other"]  # type: ignore[index]
