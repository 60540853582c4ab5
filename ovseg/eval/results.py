"""``results.json`` (read by other tools; schema below) and ``results.md`` (for people).

Schema: top level ``method``, ``weights``, ``ovseg_version``, ``world_size``, ``config``,
``protocol`` (name, version, source) and ``datasets``: ``{name: {protocol, protocol_settings,
class_names, class_names_source, num_images, confusion_matrix (C×C ints, rows = ground truth), mIoU,
pAcc, mAcc, per_class: {class_name: {IoU, Acc}}}}``. Scores in percent, rounded to 2 decimals;
undefined (NaN) scores are ``null``.

Files written by ``ovseg bench run`` (:mod:`ovseg.bench.suite`) add a ``bench`` record (suite, entry,
evaluations = the metafile rows it reproduces, role ``entry`` | ``fold`` | ``part``, config_hash,
complete); a k-fold entry's file holds, per dataset, the mean over the folds with ``std`` and ``folds``
(each fold's scores) instead of a confusion matrix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ovseg import __version__
from ovseg.eval.metrics import SegScores
from ovseg.utils.io import atomic_write_json, atomic_write_text


def _pct(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 2)


def dataset_entry(
    protocol_name: str,
    settings: dict[str, Any],
    class_names: list[list[str]],
    class_names_source: str,
    confmat: np.ndarray,
    scores: SegScores,
    num_images: int,
) -> dict[str, Any]:
    display = [c[0] for c in class_names]
    return {
        "protocol": protocol_name,
        "protocol_settings": settings,
        "class_names": [list(c) for c in class_names],
        "class_names_source": class_names_source,
        "num_images": int(num_images),
        "confusion_matrix": np.asarray(confmat, dtype=np.int64).tolist(),
        "mIoU": _pct(scores.mIoU),
        "pAcc": _pct(scores.pAcc),
        "mAcc": _pct(scores.mAcc),
        "per_class": {
            name: {"IoU": _pct(iou), "Acc": _pct(acc)} for name, iou, acc in zip(display, scores.iou, scores.acc)
        },
    }


def build_results(
    method: str, weights: str, world_size: int, config: dict[str, Any] | None, protocol: dict[str, Any],
    datasets: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    return {
        "method": method,
        "weights": weights,
        "ovseg_version": __version__,
        "world_size": int(world_size),
        "config": config or {},
        "protocol": protocol,
        "datasets": datasets,
    }


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def results_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# {results['method']} — {results['protocol']['name']} protocol",
        "",
        f"weights: `{results['weights']}` · ovseg {results['ovseg_version']} · world size {results['world_size']}",
        "",
        "| dataset | images | mIoU | pAcc | mAcc |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, d in results["datasets"].items():
        lines.append(f"| {name} | {d['num_images']} | {_fmt(d['mIoU'])} | {_fmt(d['pAcc'])} | {_fmt(d['mAcc'])} |")
    for name, d in results["datasets"].items():
        lines += ["", f"## {name} per class", "", "| class | IoU | Acc |", "|---|---:|---:|"]
        lines += [f"| {c} | {_fmt(v['IoU'])} | {_fmt(v['Acc'])} |" for c, v in d["per_class"].items()]
    return "\n".join(lines) + "\n"


def summary_table(results: dict[str, Any]) -> str:
    """The short console table: one row per dataset."""
    rows = [("dataset", "images", "mIoU", "pAcc", "mAcc")]
    rows += [
        (n, str(d["num_images"]), _fmt(d["mIoU"]), _fmt(d["pAcc"]), _fmt(d["mAcc"]))
        for n, d in results["datasets"].items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def write_results(directory: str | Path, results: dict[str, Any]) -> tuple[Path, Path]:
    directory = Path(directory)
    json_path, md_path = directory / "results.json", directory / "results.md"
    atomic_write_json(json_path, results)
    atomic_write_text(md_path, results_markdown(results))
    return json_path, md_path
