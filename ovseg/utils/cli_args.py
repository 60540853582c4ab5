"""Reading a LightningCLI command line and config files without building the parser."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def config_arguments(args: list[str]) -> list[tuple[str, list[str]]]:
    """Each ``--config FILE`` / ``-c FILE`` / ``--config=FILE`` of ``args``, in order, with the arguments that remain
    without it."""
    found = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            found.append((args[i + 1], args[:i] + args[i + 2:]))
        elif arg.startswith("--config="):
            found.append((arg.split("=", 1)[1], args[:i] + args[i + 1:]))
    return found


def read_lightning_config(path: str | Path) -> dict[str, Any]:
    """A config file as LightningCLI reads it: a top-level group given as a fragment file (``data: ../data/x.yaml``,
    relative to the config) is replaced by the fragment's content."""
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping")
    for key, value in list(data.items()):
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            fragment = (path.parent / value).resolve()
            if not fragment.is_file():
                raise FileNotFoundError(f"{path}: {key}: fragment {value} not found ({fragment})")
            data[key] = yaml.safe_load(fragment.read_text(encoding="utf-8")) or {}
    return data


def canonical_key(key: str) -> str:
    """``--model.init_args.clip.name`` -> ``model.clip.name`` (both spellings set the same thing; a leading
    ``init_args.`` goes too)."""
    return re.sub(r"(?:^|\.)init_args(?=\.|$)", "", key.lstrip("-")).lstrip(".")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings -> ``{canonical dotted key: value}``."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {canonical_key(prefix): data} if prefix else {}
