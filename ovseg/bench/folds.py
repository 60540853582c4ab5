"""The Pascal Context 4-fold table of CLIP-S4: per fold and mean ± std over the folds of mIoU / pAcc / mAcc
(all 59 classes), unknown-class mIoU, known-class mIoU and their harmonic mean — built from the four
``results.json`` files that ``ovseg test`` wrote, never from re-typed numbers.

    # score four checkpoints (one `ovseg test` per fold, each with its fold's config), then the table
    ovseg folds run --root /data/ovseg --ckpts f0.ckpt f1.ckpt f2.ckpt f3.ckpt --out folds/
    # or only the table, from existing results files (fold order)
    ovseg folds table folds/fold0/results.json ... --out folds/

Mean and std come from :func:`ovseg.eval.results.aggregate_folds` (the one fold aggregator, also behind
``ovseg bench run``'s k-fold entries): the population std over the folds (numpy's default, ddof=0); ``--ddof 1``
for the sample std.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ovseg.eval.results import aggregate_folds
from ovseg.utils.io import atomic_write_json, atomic_write_text
from ovseg.utils.project import project_path

__all__ = ["METRICS", "fold_table", "format_table", "run_folds", "register"]

#: (results key, column title)
METRICS = (("mIoU", "mIoU"), ("pAcc", "pAcc"), ("mAcc", "mAcc"), ("unknown_mIoU", "mIoU unknown"),
           ("known_mIoU", "mIoU known"), ("hIoU", "hIoU"))


def fold_table(results: list[dict[str, Any] | str | Path], dataset: str = "context59", ddof: int = 0) -> dict:
    """Results (dicts or results.json paths, fold order) -> ``{"folds": [{metric: value}], "mean": {...},
    "std": {...}, "dataset": ...}``; a metric without a number in every fold has no mean (None)."""
    rows, loaded = [], {}
    for i, r in enumerate(results):
        data = json.loads(Path(r).read_text()) if isinstance(r, (str, Path)) else r
        if dataset not in data["datasets"]:
            raise KeyError(f"results have no {dataset!r} entry (datasets: {sorted(data['datasets'])})")
        entry = data["datasets"][dataset]
        missing = [k for k, _ in METRICS if k not in entry]
        if missing:
            raise KeyError(f"{dataset} results lack {missing}: score a CLIPS4 checkpoint with its fold config")
        row = {k: entry[k] for k, _ in METRICS}
        row["unknown_classes"] = entry.get("unknown_classes", [])
        rows.append(row)
        loaded[f"fold{i}"] = {"datasets": {dataset: entry}}
    aggregate = aggregate_folds(loaded, ddof)["datasets"][dataset]
    mean = {k: aggregate.get(k) for k, _ in METRICS}
    std = {k: aggregate["std"].get(k) for k, _ in METRICS}
    return {"dataset": dataset, "folds": rows, "mean": mean, "std": std, "ddof": ddof}


def format_table(table: dict) -> str:
    """Markdown: one row per fold, then mean ± std."""
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    head = "| fold | " + " | ".join(t for _, t in METRICS) + " |"
    lines = [f"# CLIP-S4 4-fold unknown-class protocol ({table['dataset']})", "", head,
             "|" + "---|" * (len(METRICS) + 1)]
    for i, row in enumerate(table["folds"]):
        lines.append(f"| {i} | " + " | ".join(fmt(row[k]) for k, _ in METRICS) + " |")
    lines.append("| mean ± std | " + " | ".join(
        f"{fmt(table['mean'][k])} ± {fmt(table['std'][k])}" for k, _ in METRICS) + " |")
    return "\n".join(lines) + "\n"


def run_folds(root: str, ckpts: list[str], out: str | Path, configs: list[str] | None = None,
              extra: list[str] | None = None) -> dict:
    """``ovseg test`` fold ``i``'s checkpoint with its config and ``known_classes: context59-fold{i}`` into
    ``out/fold{i}``; returns the table (also written to ``out/report.md`` and ``out/report.json``)."""
    from ovseg.runner import read_checkpoint_hparams, run_trainer

    if len(ckpts) != 4:
        raise ValueError(f"need one checkpoint per fold (4), got {len(ckpts)}")
    for i, ckpt in enumerate(ckpts):  # a checkpoint scored as another fold would give a plausible, wrong table
        trained_on = read_checkpoint_hparams(ckpt).get("known_classes")
        if trained_on != f"context59-fold{i}":
            raise ValueError(f"{ckpt}: given as fold {i}, but trained with known_classes {trained_on!r} (expected "
                             f"'context59-fold{i}'); pass the checkpoints in fold order 0..3")
    configs = configs or [str(project_path("configs/clips4_context.yaml"))] * 4
    out = Path(out)
    paths = []
    for i, (config, ckpt) in enumerate(zip(configs, ckpts)):
        fold_dir = out / f"fold{i}"
        run_trainer("test", ["--config", config, "--model.init_args.known_classes", f"context59-fold{i}",
                             "--data.root", root, "--ckpt_path", ckpt,
                             "--model.init_args.results_dir", str(fold_dir),
                             "--trainer.default_root_dir", str(fold_dir), *(extra or [])])
        paths.append(fold_dir / "results.json")
    return write_report(paths, out)


def write_report(paths: list[str | Path], out: str | Path, dataset: str = "context59", ddof: int = 0) -> dict:
    table = fold_table(paths, dataset, ddof)
    table["results_files"] = [str(p) for p in paths]
    out = Path(out)
    atomic_write_json(out / "report.json", table)
    atomic_write_text(out / "report.md", format_table(table))
    print(format_table(table))
    print(f"report: {out / 'report.md'}")
    return table


def register(subparsers) -> None:
    parser = subparsers.add_parser("folds", help="CLIP-S4 Pascal Context 4-fold: test the fold checkpoints, "
                                                 "per-fold and mean ± std table")
    sub = parser.add_subparsers(dest="folds_command", required=True)
    run = sub.add_parser("run", help="ovseg test the four fold checkpoints, then the table")
    run.add_argument("--root", required=True, help="data root")
    run.add_argument("--ckpts", nargs=4, required=True, metavar="CKPT", help="fold 0..3 checkpoints")
    run.add_argument("--configs", nargs=4, metavar="YAML",
                     help="per-fold configs (default: configs/clips4_context.yaml; fold i always gets known_classes "
                          "context59-fold<i>)")
    run.add_argument("--out", default="outputs/clips4_folds")
    run.add_argument("extra", nargs="*", help="more `ovseg test` arguments (after --)")
    run.set_defaults(func=lambda ns: run_folds(ns.root, ns.ckpts, ns.out, ns.configs, ns.extra) and 0)
    table = sub.add_parser("table", help="the table from four results.json files (fold order)")
    table.add_argument("results", nargs=4)
    table.add_argument("--out", default="outputs/clips4_folds")
    table.add_argument("--dataset", default="context59")
    table.add_argument("--ddof", type=int, default=0)
    table.set_defaults(func=lambda ns: write_report(ns.results, ns.out, ns.dataset, ns.ddof) and 0)
