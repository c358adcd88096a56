"""Imports flow one way: `policy/` uses `guard/`, never the reverse (the screener reads a policy through
guard.policyview's Protocols)."""

from __future__ import annotations

import ast
from pathlib import Path

import rsafe_proxy
from rsafe_proxy.config import Settings
from rsafe_proxy.guard.policyview import PolicyView
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.policy.loading import load_policy
from rsafe_proxy.policy.tenancy import policy_paths

GUARD = Path(rsafe_proxy.__file__).parent / "guard"


def imported(source: str) -> set[str]:
    """Every module a module's source imports, at any depth of its code (a function's lazy import too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_check_sees_an_import_of_policy() -> None:
    found = imported("def f():\n    from rsafe_proxy.policy.schema import Policy\nfrom rsafe_proxy import policy\n")
    assert {"rsafe_proxy.policy.schema", "rsafe_proxy.policy"} <= found


def test_no_guard_module_imports_policy() -> None:
    modules = sorted(GUARD.rglob("*.py"))
    assert len(modules) > 10
    offenders = {
        str(path.relative_to(GUARD)): sorted(
            name
            for name in imported(path.read_text(encoding="utf-8"))
            if name == "rsafe_proxy.policy" or name.startswith("rsafe_proxy.policy.")
        )
        for path in modules
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_a_policy_is_what_the_screener_reads() -> None:
    view: PolicyView = load_policy(policy_paths(Settings())["default"])  # mypy: Policy satisfies the Protocol
    assert [category.action.strictness for category in view.categories_for(Side.INPUT)]
    assert view.default_action.strictness == 2  # block
