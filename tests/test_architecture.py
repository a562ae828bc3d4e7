"""The shape of the package: imports point one way, and the plugin module stays thin.

ARCHITECTURE.md describes the rooms; these tests keep the house as it describes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_fastsched"
FOUNDATIONS = ("_options", "_records", "_postgres", "_wallclock", "_hookspecs")
"""Modules that import no other module of the plugin."""


def _imported_modules(path: Path) -> set[str]:
    """The plugin's modules ``path`` imports anywhere: at the top, in functions, for typing."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "pytest_fastsched":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "pytest_fastsched."
        ):
            found.add(str(node.module).split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("pytest_fastsched.")
            }
    return found - {path.stem}


def _graph() -> dict[str, set[str]]:
    return {path.stem: _imported_modules(path) for path in sorted(PACKAGE.glob("*.py"))}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, as the modules on it, or ``None``."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for imported in sorted(graph.get(module, ())):
            found = visit(imported, [*path, module])
            if found is not None:
                return found
        done.add(module)
        return None

    for module in graph:
        found = visit(module, [])
        if found is not None:
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_form_is_seen(tmp_path: Path) -> None:
    module = tmp_path / "_sample.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from pytest_fastsched import _a, _b\n"
        "import pytest_fastsched._c\n"
        "if TYPE_CHECKING:\n"
        "    from pytest_fastsched._d import Thing\n"
        "def f():\n"
        "    from pytest_fastsched._e import other\n"
    )
    assert _imported_modules(module) == {"_a", "_b", "_c", "_d", "_e"}


@pytest.mark.parametrize("module", FOUNDATIONS)
def test_foundations_import_nothing_of_the_plugin(module: str) -> None:
    assert _graph()[module] == set()


def test_the_plugin_module_stays_thin() -> None:
    lines = (PACKAGE / "plugin.py").read_text().splitlines()
    assert len(lines) < 300


def test_each_pytest_hook_is_implemented_once_in_the_plugin_module() -> None:
    hooks: list[str] = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "_hookspecs":
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("pytest_"):
                hooks.append(f"{path.stem}.{node.name}")
        assert "specname" not in path.read_text(), f"{path.stem} renames a hook implementation"
    assert all(hook.startswith("plugin.") for hook in hooks), hooks
    assert len(hooks) == len(set(hooks))


def _layers() -> list[list[str]]:
    """The rows of the import diagram in ARCHITECTURE.md, top row first."""
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    section = text.split("## The direction of imports", 1)[1]
    diagram = section.split("```\n", 2)[1]
    return [row.replace(",", " ").split() for row in diagram.strip().splitlines()]


def test_the_diagram_names_every_module_once() -> None:
    named = [module for row in _layers() for module in row]
    assert sorted(named) == sorted(_graph())


def test_every_import_points_down_the_diagram() -> None:
    row_of = {module: index for index, row in enumerate(_layers()) for module in row}
    upward = [
        f"{module} -> {imported}"
        for module, imports in _graph().items()
        for imported in imports
        if row_of[imported] <= row_of[module]
    ]
    assert upward == []
