"""The README's layout rule, checked on the source: folders depend downwards only
(``utils ← data ← models ← eval ← methods ← bench, tools, toyworld, parity, runner, cli``), and the top folders
import each other without a cycle. Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ovseg"
#: a folder (or top-level module) -> its tier; a module may import only from lower tiers or its own folder
TIERS = {"utils": 0, "data": 1, "models": 2, "eval": 3, "methods": 4}
TOP = 5  # bench, tools, toyworld, parity, runner, cli, __main__


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ovseg"


def import_edges() -> dict[str, set[tuple[str, str]]]:
    """folder -> {(imported folder, importing module)}, over every import statement (also inside functions)."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        annotation_only = {id(n) for node in ast.walk(tree)
                           if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                           for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in annotation_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ovseg."):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("ovseg.")]
            else:
                continue
            for target in targets:
                if _folder(target) != _folder(module):
                    edges[_folder(module)].add((_folder(target), module))
    return edges


def tier(folder: str) -> int:
    return -1 if folder == "ovseg" else TIERS.get(folder, TOP)  # ovseg/__init__: the version string


def test_folders_depend_downwards_only():
    upward = sorted(f"{module} imports ovseg.{target}"
                    for folder, edges in import_edges().items() if tier(folder) < TOP
                    for target, module in edges if tier(target) >= tier(folder))
    assert upward == []


def test_top_folders_import_each_other_without_a_cycle():
    graph = {folder: {t for t, _ in edges if tier(t) == TOP} for folder, edges in import_edges().items()
             if tier(folder) == TOP}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = 2

    for folder in sorted(graph):
        visit(folder, [])


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a data module importing a method is reported."""
    fake = tmp_path / "ovseg"
    (fake / "data").mkdir(parents=True)
    (fake / "methods").mkdir()
    (fake / "data" / "x.py").write_text("from ovseg.methods.base import OVSegMethod\n")
    (fake / "methods" / "y.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from ovseg.bench import suite\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert import_edges() == {"data": {("methods", "ovseg.data.x")}}
