"""The README's layout rule, checked on the source: folders depend downwards only
(``utils ← data ← models ← eval ← methods ← bench, tools, toyworld, parity, runner, cli``), the top folders import
each other without a cycle, and no module imports itself through others. Every import counts, those inside
functions and under ``if TYPE_CHECKING:`` too: an annotation that needs a higher layer is a dependency on it (the
evaluation takes a method as :class:`ovseg.eval.contract.EvaluatedMethod`, a ``typing.Protocol``)."""

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


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) of every ``ovseg`` import statement of a module (also inside functions
    and under ``if TYPE_CHECKING:``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ovseg."):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("ovseg.")]
    return found


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def import_edges() -> dict[str, set[tuple[str, str]]]:
    """folder -> {(imported folder, importing module)}, over every import statement."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for module, path in _modules().items():
        for target, _ in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if _folder(target) != _folder(module):
                edges[_folder(module)].add((_folder(target), module))
    return edges


def module_graph() -> dict[str, set[str]]:
    """module -> the ovseg modules it imports (``from ovseg.x import y``: ``ovseg.x.y`` when that is a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for target, names in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            targets.update(submodules or ([target] if target in modules else []))
        graph[module] = targets - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its nodes in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        if state.get(node) == 1:
            return path[path.index(node):] + [node]
        if state.get(node) == 2:
            return None
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, path + [node])
            if cycle:
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


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
    assert find_cycle(graph) is None


def test_no_module_imports_itself_through_others():
    """A circle (``attention -> clip -> clip_loading -> clip``, ``evaluator -> methods.base -> session``) means
    neither side can be read, tested or changed alone; protocols break them."""
    assert find_cycle(module_graph()) is None


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a data module importing a method is reported."""
    fake = tmp_path / "ovseg"
    (fake / "data").mkdir(parents=True)
    (fake / "methods").mkdir()
    (fake / "data" / "x.py").write_text("from ovseg.methods.base import OVSegMethod\n")
    (fake / "methods" / "y.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from ovseg.bench import suite\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert import_edges() == {"data": {("methods", "ovseg.data.x")}, "methods": {("bench", "ovseg.methods.y")}}


def test_the_check_sees_a_circle_through_annotations(tmp_path, monkeypatch):
    fake = tmp_path / "ovseg"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "a.py").write_text("from ovseg.models.b import f\n")
    (fake / "models" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                          "    from ovseg.models import a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert find_cycle(module_graph()) == ["ovseg.models.a", "ovseg.models.b", "ovseg.models.a"]
