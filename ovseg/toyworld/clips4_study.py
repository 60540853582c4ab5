"""CLIP-S4 training variants compared on the toy world over seeds: the fine-tuned mIoU, the toy 4-fold hIoU, and
how often a segment the known classes explain trains towards an unknown prototype.

    ovseg toyworld clips4-study --root data/toyworld --out outputs/clips4_study --seeds 0 1 2 \\
        --variant "before: --model.init_args.segments embedding --model.init_args.pixel_loss infonce \\
                   --model.init_args.unknown_targets shared" --variant "now:"

Each variant is a name and the ``ovseg fit/test`` arguments that make it; every stage is the toy leaderboard's
(:mod:`ovseg.toyworld.leaderboard`), so the numbers are comparable with its table.
"""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ovseg.toyworld.leaderboard import CONFIGS, LeaderboardSettings, _fit, _run_folds, _test

__all__ = ["parse_variant", "run_study", "format_study"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"name: --arg value ..."`` -> (name, arguments)."""
    name, _, args = text.partition(":")
    if not name.strip():
        raise ValueError(f"a variant is 'name: --arg value ...', got {text!r}")
    return name.strip(), shlex.split(args)


def _logged_mean(log_dir: Path, key: str) -> float | None:
    """Mean of a logged training metric over the steps that logged it (CSVLogger's metrics.csv)."""
    path = log_dir / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        values = [float(row[key]) for row in csv.DictReader(f) if row.get(key) not in (None, "")]
    return float(np.mean(values)) if values else None


def run_study(s: LeaderboardSettings, variants: list[tuple[str, list[str]]], seeds: list[int], folds: bool = True,
              log=print) -> dict[str, Any]:
    config = CONFIGS / "clips4.yaml"
    out = Path(s.out)
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, args in variants:
        for seed in seeds:
            run = replace(s, seed=seed, out=str(out / name / f"seed{seed}"), extra=[*args, *s.extra], folds=folds)
            log(f"[clips4-study] {name}, seed {seed}: fine-tune {run.clips4_steps} steps")
            ckpt, _ = _fit(config, Path(run.out) / "fit", run.clips4_steps, run)
            tuned = _test(config, Path(run.out) / "tuned", run, "--ckpt_path", str(ckpt))
            row = {"seed": seed, "mIoU": tuned["mIoU"],
                   "known_lost_to_unknown": _logged_mean(Path(run.out) / "fit", "train/known_lost_to_unknown")}
            if folds:
                table = _run_folds(run, Path(run.out), log)["tuned"]
                row["fold_mIoU"] = table["mean"]["mIoU"]
                row["hIoU"] = table["mean"].get("hIoU")
            rows.setdefault(name, []).append(row)
    study = {"root": s.root, "steps": s.clips4_steps, "fold_steps": s.fold_steps, "seeds": seeds,
             "variants": {name: {"args": args, "runs": rows[name]} for name, args in variants}}
    from ovseg.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "study.json", study)
    atomic_write_text(out / "study.md", format_study(study))
    return study


def format_study(study: dict[str, Any]) -> str:
    def cell(values: list[float | None], digits: int = 2) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}" if len(values) > 1 else \
            f"{values[0]:.{digits}f}"

    lines = [f"| variant | fine-tuned mIoU ({study['steps']} steps) | per seed | 4-fold mIoU | 4-fold hIoU | "
             "known segments lost to unknown prototypes |", "|---|---|---|---|---|---|"]
    for name, variant in study["variants"].items():
        runs = variant["runs"]
        per_seed = " / ".join(f"{r['mIoU']:.2f}" for r in runs)
        lost = [r["known_lost_to_unknown"] for r in runs]
        lines.append(f"| {name} | {cell([r['mIoU'] for r in runs])} | {per_seed} | "
                     f"{cell([r.get('fold_mIoU') for r in runs])} | {cell([r.get('hIoU') for r in runs])} | "
                     f"{cell([100 * v if v is not None else None for v in lost], 1)}% |")
    args = [f"- {name}: `{' '.join(v['args']) or '(the defaults)'}`" for name, v in study["variants"].items()]
    return "\n".join(lines + ["", f"Seeds {', '.join(map(str, study['seeds']))}; toy world {study['root']}.", *args]) \
        + "\n"


def main(ns) -> int:
    settings = LeaderboardSettings(root=ns.root, out=ns.out, clips4_steps=ns.steps, fold_steps=ns.steps,
                                   reuse=ns.reuse, extra=ns.extra, gallery=0)
    study = run_study(settings, [parse_variant(v) for v in ns.variant], ns.seeds, folds=not ns.no_folds)
    print(format_study(study))
    print(json.dumps({"study": f"{ns.out}/study.md"}))
    return 0
