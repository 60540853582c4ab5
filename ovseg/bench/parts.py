"""The results files of a suite run's parts (one ``ovseg test`` each) and their merge into one results file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ovseg.eval.results import version_sort_key


def dataset_name(entry: Any) -> str:
    return entry["name"] if isinstance(entry, dict) else str(entry)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def merge_parts(parts: list[dict], datasets: list[Any]) -> dict:
    """Per-dataset results files of one run -> one results file (the results.json schema)."""
    first = parts[0]
    for p in parts[1:]:
        if p.get("method") != first.get("method"):
            raise ValueError(f"parts disagree on the method: {p.get('method')} vs {first.get('method')}")
        if (p.get("protocol") or {}).get("name") != (first.get("protocol") or {}).get("name"):
            raise ValueError("parts disagree on the protocol")
    weights = sorted({str(p.get("weights")) for p in parts})
    versions = sorted({str(p.get("ovseg_version")) for p in parts}, key=version_sort_key)
    config = json.loads(json.dumps(first.get("config") or {}))
    if isinstance(config.get("data"), dict):
        config["data"]["datasets"] = datasets
    merged_datasets: dict[str, Any] = {}
    by_name = {}
    for p in parts:
        by_name.update(p.get("datasets") or {})
    for d in datasets:
        name = dataset_name(d)
        if name in by_name:
            merged_datasets[name] = by_name[name]
    return {
        "method": first.get("method"),
        "weights": weights[0] if len(weights) == 1 else "; ".join(weights),
        "ovseg_version": versions[0],  # the oldest, so a mixed resume is reported as such
        "world_size": max(int(p.get("world_size") or 1) for p in parts),
        "config": config,
        "protocol": first.get("protocol"),
        "datasets": merged_datasets,
    }
