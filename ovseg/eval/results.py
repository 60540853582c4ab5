"""``results.json`` (read by other tools; schema below) and ``results.md`` (for people).

Schema: top level ``method``, ``weights``, ``ovseg_version``, ``world_size``, ``config``,
``protocol`` (name, version, source) and ``datasets``: ``{name: {protocol, protocol_settings,
class_names, class_names_source, num_images, confusion_matrix (C×C ints, rows = ground truth), mIoU,
pAcc, mAcc, per_class: {class_name: {IoU, Acc}}}}``. Scores in percent, rounded to 2 decimals;
undefined (NaN) scores are ``null``.

Files written by ``ovseg bench run`` (:mod:`ovseg.bench.suite_runner`) add a ``bench`` record (suite, entry,
evaluations = the metafile rows it reproduces, role ``entry`` | ``fold`` | ``part``, config_hash,
complete); a k-fold entry's file holds, per dataset, the mean over the folds with ``std`` and ``folds``
(each fold's scores) instead of a confusion matrix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovseg import __version__
from ovseg.data.classnames import display_names
from ovseg.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # results files are read and aggregated by commands that never compute a score
    from ovseg.eval.metrics import SegScores


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
    display = display_names(class_names)
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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not (isinstance(x, float) and math.isnan(x))


def aggregate_folds(folds: dict[str, dict], ddof: int = 0) -> dict:
    """Per-fold results (fold name -> results dict) -> one results dict whose dataset scores are the mean over the
    folds, with ``std`` (``ddof`` 0: the population standard deviation, numpy's default; 1: the sample std) and
    each fold's scores under ``folds``. A score enters only when every fold has a number for it: a mean over some
    of the folds would be reported as a mean over all of them. The one fold aggregator: ``ovseg bench run``'s
    k-fold entries and ``ovseg folds`` both use it."""
    names = list(folds)
    first = folds[names[0]]
    common = [d for d in first.get("datasets", {}) if all(d in folds[f].get("datasets", {}) for f in names)]
    datasets = {}
    for d in common:
        entries = {f: folds[f]["datasets"][d] for f in names}
        metrics = [k for k, v in entries[names[0]].items()
                   if k != "num_images" and _is_number(v) and all(_is_number(entries[f].get(k)) for f in names)]
        out: dict[str, Any] = {"protocol": entries[names[0]].get("protocol"),
                               "num_images": entries[names[0]].get("num_images")}
        std = {}
        for m in metrics:
            vals = [float(entries[f][m]) for f in names]
            mean = sum(vals) / len(vals)
            out[m] = round(mean, 2)
            std[m] = round(math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - ddof)), 2) \
                if len(vals) > ddof else None
        out["std"] = std
        out["folds"] = {f: {m: entries[f][m] for m in metrics} for f in names}
        kind = "population" if ddof == 0 else f"ddof={ddof}"
        out["aggregate"] = f"mean and {kind} std over {len(names)} folds ({', '.join(names)})"
        datasets[d] = out
    versions = sorted({str(folds[f].get("ovseg_version")) for f in names}, key=version_sort_key)
    return {
        "method": first.get("method"),
        "weights": "; ".join(f"{f}: {folds[f].get('weights')}" for f in names),
        "ovseg_version": versions[0],
        "world_size": max(int(folds[f].get("world_size") or 1) for f in names),
        "config": {"folds": {f: folds[f].get("config") for f in names}},
        "protocol": first.get("protocol"),
        "datasets": datasets,
    }


def fold_markdown(results: dict) -> str:
    lines = [f"# {results['method']} — {(results.get('protocol') or {}).get('name')} protocol, mean ± std over folds",
             "", f"weights: {results['weights']} · ovseg {results['ovseg_version']}", ""]
    for name, d in results["datasets"].items():
        metrics = [m for m in d.get("std", {})]
        lines += [f"## {name}", "", "| fold | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        for fold, scores in d["folds"].items():
            lines.append(f"| {fold} | " + " | ".join(f"{scores[m]:.2f}" for m in metrics) + " |")
        lines.append("| **mean ± std** | " + " | ".join(f"{d[m]:.2f} ± {d['std'][m]:.2f}" for m in metrics) + " |")
        lines.append("")
    return "\n".join(lines)


def version_sort_key(version: str) -> tuple:
    """Sort key for ovseg versions (the oldest first; unparsable ones last)."""
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(version))
    except (InvalidVersion, TypeError):
        return (1, str(version))


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
