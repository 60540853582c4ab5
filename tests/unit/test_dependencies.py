"""Every third-party module ovseg imports is declared in pyproject.toml (a dependency or an extra), so an install
from pyproject alone never depends on another package pulling it in. ``ovseg.parity`` imports the authors' code
stack, installed by ``make parity`` outside this list, and is left out."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_top_modules(package: Path, skip: tuple[str, ...] = ("parity",)) -> dict[str, str]:
    """Top-level module -> one file importing it, over every import statement (also inside functions)."""
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(package.parent)))
    return found


def declared_distributions(pyproject: Path) -> set[str]:
    """Normalised names of the distributions pyproject.toml requires or offers as extras."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def undeclared_imports(package: Path, pyproject: Path) -> dict[str, str]:
    """Imported third-party module -> importing file, for modules none of whose distributions is declared."""
    distributions = packages_distributions()
    declared = declared_distributions(pyproject)
    missing = {}
    for module, where in imported_top_modules(package).items():
        if module in sys.stdlib_module_names or module in ("ovseg", "__future__"):
            continue
        dists = {_normalise(d) for d in distributions.get(module, [module])}
        if not dists & declared:
            missing[module] = f"{where} ({', '.join(sorted(dists))})"
    return missing


def test_every_imported_package_is_declared():
    assert undeclared_imports(ROOT / "ovseg", ROOT / "pyproject.toml") == {}


def test_the_check_sees_an_undeclared_import(tmp_path):
    package = tmp_path / "ovseg"
    (package / "data").mkdir(parents=True)
    (package / "data" / "views.py").write_text("import json\nimport numpy\n\ndef f():\n    import cv2\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["numpy>=1"]\n')
    missing = undeclared_imports(package, tmp_path / "pyproject.toml")
    assert list(missing) == ["cv2"] and "opencv" in missing["cv2"]
