"""Imports flow one way: `policy/` uses `guard/`, never the reverse (the screener reads a policy through
guard.policyview's Protocols), and no two packages of rsafe_proxy import each other, however indirectly."""

from __future__ import annotations

import ast
from collections.abc import Mapping, Set
from pathlib import Path

import rsafe_proxy
from rsafe_proxy.config import Settings
from rsafe_proxy.guard.policyview import PolicyView
from rsafe_proxy.guard.protocol import Side
from rsafe_proxy.policy.loading import load_policy
from rsafe_proxy.policy.tenancy import policy_paths

PACKAGE = Path(rsafe_proxy.__file__).parent
GUARD = PACKAGE / "guard"


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


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """The nodes of a module that run: everything but the body of an `if TYPE_CHECKING:` block (types only)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def package_of(module: str) -> str:
    """A module's package: its first two dotted parts (`rsafe_proxy.guard`; a top-level module is its own)."""
    return ".".join(module.split(".")[:2])


def package_graph(root: Path) -> dict[str, set[str]]:
    """Which packages of rsafe_proxy each one imports at run time (lazy imports included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        source = package_of(".".join(("rsafe_proxy", *path.relative_to(root).with_suffix("").parts)))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = graph.setdefault(source, set())
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
                names = [node.module]
            else:
                continue
            targets.update(package_of(name) for name in names if name.startswith("rsafe_proxy."))
        targets.discard(source)
    return graph


def cycles(graph: Mapping[str, Set[str]]) -> list[list[str]]:
    """Each cycle of the graph as the path that closes it (`a -> b -> a`), one per package that lies on one."""
    found: list[list[str]] = []
    for start in sorted(graph):
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop()
            for target in sorted(graph.get(path[-1], ())):
                if target == start:
                    found.append([*path, start])
                    paths.clear()
                    break
                if target not in seen:
                    seen.add(target)
                    paths.append([*path, target])
    return found


def test_the_check_finds_a_cycle_and_skips_type_only_imports(tmp_path: Path) -> None:
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "engine.py").write_text("from rsafe_proxy.telemetry.context import inject\n")
    (tmp_path / "telemetry").mkdir()
    (tmp_path / "telemetry" / "genai.py").write_text("def f():\n    import rsafe_proxy.guard.engine\n")
    (tmp_path / "config.py").write_text("if TYPE_CHECKING:\n    from rsafe_proxy.guard import engine\n")
    graph = package_graph(tmp_path)
    assert graph["rsafe_proxy.config"] == set()
    assert cycles(graph) == [
        ["rsafe_proxy.guard", "rsafe_proxy.telemetry", "rsafe_proxy.guard"],
        ["rsafe_proxy.telemetry", "rsafe_proxy.guard", "rsafe_proxy.telemetry"],
    ]


def test_no_two_packages_import_each_other() -> None:
    graph = package_graph(PACKAGE)
    assert {"rsafe_proxy.guard", "rsafe_proxy.telemetry", "rsafe_proxy.tracecontext"} <= set(graph)
    assert cycles(graph) == []
