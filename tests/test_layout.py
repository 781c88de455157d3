"""The source tree's shape (docs/ARCHITECTURE.md): no import cycle anywhere in ``src/iopfl``, engine
modules of a readable size, and the runtime resolved in one place."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "iopfl"
ENGINE_MAX_LINES = 250


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The iopfl modules ``path`` imports anywhere in it (top level, in functions, under TYPE_CHECKING):
    ``from a.b import c`` counts as ``a.b.c`` when that is a module, else as ``a.b``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(path, set(found)) - {name} for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_inside_functions_and_type_checking_blocks(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from iopfl.config import Config\n"
        "def f():\n    from iopfl.engine import rounds\n    import iopfl.errors\n"
    )
    known = set(modules())
    assert imported(source, known) == {"iopfl.config", "iopfl.engine.rounds", "iopfl.errors"}


def test_no_import_cycle_in_src():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_no_engine_module_is_over_250_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in (PACKAGE / "engine").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > ENGINE_MAX_LINES
    }
    assert not long, f"engine modules over {ENGINE_MAX_LINES} lines: {long}"


def test_the_device_is_resolved_only_by_the_runtime():
    """Entry points resolve a ``Runtime`` (``Runtime.resolve``); nothing else asks for a device."""
    callers = [
        str(p.relative_to(SRC))
        for p in PACKAGE.rglob("*.py")
        if p.name != "runtime.py" and "resolve_device(" in p.read_text()
    ]
    assert not callers, f"resolve_device called outside iopfl/runtime.py: {callers}"
