"""The package's layout: no import circle among avis_llamacpp modules (every import counts, also those inside
functions), and one registry of test models (convert/fixtures.py) that names every family and size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_fixture_list_names_every_family_and_size():
    """`python -m convert.fixtures --list` prints one line per registered family with its sizes, and every
    family of the registry is one make_fixture call away (unknown names are refused with the list)."""
    from convert.fixtures import REGISTRY, SIZES, _SPECS, make_fixture

    out = subprocess.run([sys.executable, "-m", "convert.fixtures", "--list"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    listed = {line.split()[0]: line.split()[1:-1] for line in out.splitlines()}
    families = {"llava", "qwen25vl", "qwen3vl", "ldpv2", "gemma3", "gemma4v", "pixtral", "lightonocr", "internvl",
                "idefics3", "lfm2"}
    assert set(listed) == set(REGISTRY) == families
    for fam, sizes in listed.items():
        assert sizes == [s for s in SIZES if (fam, s) in _SPECS or (s == "tiny" and fam not in
                                                                    {f for f, _ in _SPECS})], fam
    with pytest.raises(ValueError, match="families: llava, qwen25vl"):
        make_fixture("nosuch")
    with pytest.raises(ValueError, match="its sizes: tiny"):
        make_fixture("gemma3", "bench")
