"""Files of the ovseg project that the package does not hold: the run configs (``configs/``) and the benchmark
files (``benchmarks/``). Commands that use one by default look for it explicitly, in this order:

1. under ``$OVSEG_PROJECT`` (a project folder named by the user);
2. under the current folder (as ``--config configs/…`` paths are read);
3. under the checkout the package is imported from (an editable install, e.g. ``make install``).

An installed wheel has no checkout: it finds them under 1 or 2, or the command names the file it missed.
"""

from __future__ import annotations

import os
from pathlib import Path

#: environment variable naming the project folder
PROJECT_ENV = "OVSEG_PROJECT"


def checkout() -> Path | None:
    """The source checkout this package is imported from, or None (an installed package)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "ovseg" / "__init__.py").is_file() else None


def project_path(relative: str | Path) -> Path:
    """``relative`` (e.g. ``configs/toyworld``) in the first of the places above that holds it; else relative to
    the current folder, so that an error about it names the path the user can create or pass."""
    places = [Path(os.environ[PROJECT_ENV]).expanduser()] if os.environ.get(PROJECT_ENV) else []
    places += [Path.cwd()] + ([root] if (root := checkout()) is not None else [])
    for place in places:
        if (place / relative).exists():
            return place / relative
    return Path(relative)
