"""The package's layout: no import circle among avis_llamacpp modules (every import counts, also those inside
functions)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "avis_llamacpp"


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (relative or absolute imports)."""
    modules = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 or (node.level == 0 and node.module and node.module.split(".")[0] == package.name):
                    parts = (node.module or "").split(".")
                    if node.level == 0:
                        parts = parts[1:]
                    deps |= {parts[0]} if parts and parts[0] else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package.name + ".")}
        graph[path.stem] = {d for d in deps if d in modules and d != path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_cycle_finder_on_hand_made_graphs(tmp_path):
    """The checker itself: it reads lazy (in-function) and relative imports and finds a circle through them."""
    pkg = tmp_path / "avis_llamacpp"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from avis_llamacpp import c\n")
    (pkg / "c.py").write_text("import os\n")
    graph = import_graph(pkg)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": set()}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("def g():\n    from . import a\n")
    assert find_cycle(import_graph(pkg)) == ["a", "b", "c", "a"]


def test_no_import_circle_in_the_package():
    graph = import_graph(PACKAGE)
    assert {"cli", "cli_args", "bench", "calibrate"} <= set(graph)
    assert "cli" not in graph["bench"] | graph["calibrate"], "bench / calibrate import the dispatcher"
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"

