"""CLIP-S4 training variants compared on the toy world over seeds: the fine-tuned mIoU, the toy 4-fold scores
(known / unknown mIoU, hIoU) and, per fold, where the unknown prototypes go (the share of held-out-class and of
known-class segments whose CLIP target is an unknown prototype, and the held-out share of the bank's food, measured
against the toy ground truth by :mod:`ovseg.methods.clips4.diagnostics`).

    ovseg toyworld clips4-study --root data/toyworld --out outputs/clips4_study --seeds 0 1 2 \\
        --variant "gated: --model.init_args.unknown_targets gated" --variant "now:"

Each variant is a name and the ``ovseg fit/test`` arguments that make it; every stage is the toy leaderboard's
(:mod:`ovseg.toyworld.leaderboard`), so the numbers are comparable with its table. The folds' frozen starts do not
depend on the variant or the seed: they are scored once, under ``<out>/frozen``.
"""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ovseg.toyworld.leaderboard import CONFIGS, DATASET, LeaderboardSettings, _fit, _run_folds, _test

__all__ = ["parse_variant", "run_study", "format_study", "load_fitted", "fold_diagnostics"]

FOLD_KEYS = ("mIoU", "known_mIoU", "unknown_mIoU", "hIoU")


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


def load_fitted(log_dir: Path):
    """The CLIP-S4 model of a finished ``ovseg fit`` (its ``config.yaml`` and ``checkpoints/last.ckpt``), and that
    config as plain data."""
    import yaml
    from jsonargparse import ArgumentParser

    from ovseg.methods.base import OVSegMethod
    from ovseg.utils.io import load_weights_file

    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(OVSegMethod, "model")
    model = parser.instantiate_classes(parser.parse_object({"model": config["model"]})).model
    state = load_weights_file(log_dir / "checkpoints" / "last.ckpt", "checkpoint")["state_dict"]
    model.load_state_dict(state)
    return model.eval(), config


def fold_diagnostics(log_dir: Path, root: str, images: int) -> dict[str, Any]:
    """:func:`ovseg.methods.clips4.diagnostics.unknown_target_shares` of a fold's fitted model on the first
    ``images`` toy train images (the images it trained on, with their labels)."""
    from ovseg.data.seg_dataset import SegFileDataset
    from ovseg.methods.clips4.diagnostics import unknown_target_shares

    model, config = load_fitted(log_dir)
    views = config["data"]["init_args"]["train"]["init_args"]
    dataset = SegFileDataset(DATASET, root, "train")
    names = [synonyms[0] for synonyms in dataset.class_names]
    samples = (dataset[i] for i in range(min(images, len(dataset))))
    keys = ("regions", "region_count", "region_compactness", "region_scale")
    return unknown_target_shares(model, samples, names, views["crop_size"], **{k: views[k] for k in keys if k in views})


def run_study(s: LeaderboardSettings, variants: list[tuple[str, list[str]]], seeds: list[int], folds: bool = True,
              tune: bool = True, diagnostic_images: int = 200, log=print) -> dict[str, Any]:
    config = CONFIGS / "clips4.yaml"
    out = Path(s.out)
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, args in variants:
        for seed in seeds:
            run = replace(s, seed=seed, out=str(out / name / f"seed{seed}"), extra=[*args, *s.extra], folds=folds)
            row: dict[str, Any] = {"seed": seed}
            if tune:
                log(f"[clips4-study] {name}, seed {seed}: fine-tune {run.clips4_steps} steps")
                ckpt, _ = _fit(config, Path(run.out) / "fit", run.clips4_steps, run)
                row["mIoU"] = _test(config, Path(run.out) / "tuned", run, "--ckpt_path", str(ckpt))["mIoU"]
                row["unknown_argmax"] = _logged_mean(Path(run.out) / "fit", "train/unknown_argmax")
            if folds:
                result = _run_folds(run, Path(run.out), log, frozen_out=out / "frozen")
                table = result["tuned"]
                row.update({f"fold_{k}": table["mean"].get(k) for k in FOLD_KEYS})
                row["frozen"] = {k: result["frozen"]["mean"].get(k) for k in FOLD_KEYS}
                row["fold_diagnostics"] = [
                    fold_diagnostics(Path(run.out) / "clips4_folds" / f"fold{fold}" / "fit", s.root, diagnostic_images)
                    for fold in range(4)]
                row["fold_unknown_argmax"] = [
                    _logged_mean(Path(run.out) / "clips4_folds" / f"fold{fold}" / "fit", "train/unknown_argmax")
                    for fold in range(4)]
            rows.setdefault(name, []).append(row)
    study = {"root": s.root, "steps": s.clips4_steps, "fold_steps": s.fold_steps, "seeds": seeds,
             "variants": {name: {"args": args, "runs": rows[name]} for name, args in variants}}
    from ovseg.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "study.json", study)
    atomic_write_text(out / "study.md", format_study(study))
    return study


def _cell(values: list[float | None], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}" if len(values) > 1 else \
        f"{values[0]:.{digits}f}"


def _percent(cell: str) -> str:
    return cell if cell == "–" else cell + "%"


def _diagnostic(run: dict[str, Any], key: str) -> float | None:
    """A diagnostic share, in %, averaged over a run's folds."""
    values = [d[key] for d in run.get("fold_diagnostics", []) if d.get(key) is not None]
    return 100 * float(np.mean(values)) if values else None


def format_study(study: dict[str, Any]) -> str:
    lines = [f"| variant | fine-tuned mIoU ({study['steps']} steps) | 4-fold mIoU | known mIoU | unknown mIoU | "
             "hIoU | held-out segments → unknown | known segments → unknown | held-out share of the bank's food |",
             "|---|---|---|---|---|---|---|---|---|"]
    frozen = None
    for name, variant in study["variants"].items():
        runs = variant["runs"]
        frozen = frozen or next((r["frozen"] for r in runs if r.get("frozen")), None)
        lines.append(f"| {name} | {_cell([r.get('mIoU') for r in runs])} | "
                     + " | ".join(_cell([r.get(f"fold_{k}") for r in runs]) for k in FOLD_KEYS) + " | "
                     + " | ".join(_percent(_cell([_diagnostic(r, k) for r in runs], 1)) for k in (
                         "held_out_to_unknown", "known_to_unknown", "bank_held_out")) + " |")
    if frozen:
        lines.append("| frozen start (every variant) | | " + " | ".join(
            "–" if frozen.get(k) is None else f"{frozen[k]:.2f}" for k in FOLD_KEYS) + " | | | |")
    chance = [d["held_out_share"] for v in study["variants"].values() for r in v["runs"]
              for d in r.get("fold_diagnostics", []) if d.get("held_out_share") is not None]
    notes = [f"Seeds {', '.join(map(str, study['seeds']))}; toy world {study['root']}; mean ± std over seeds "
             f"(4-fold columns: the mean over the folds of each seed)."]
    if chance:
        notes.append(f"Held-out classes hold {100 * float(np.mean(chance)):.1f}% of the labelled segments (the bank's "
                     "food at chance).")
    args = [f"- {name}: `{' '.join(v['args']) or '(the defaults)'}`" for name, v in study["variants"].items()]
    return "\n".join(lines + ["", *notes, *args]) + "\n"


def main(ns) -> int:
    settings = LeaderboardSettings(root=ns.root, out=ns.out, clips4_steps=ns.steps, fold_steps=ns.steps,
                                   reuse=ns.reuse, extra=ns.extra, gallery=0)
    study = run_study(settings, [parse_variant(v) for v in ns.variant], ns.seeds, folds=not ns.no_folds,
                      tune=not ns.no_tune, diagnostic_images=ns.diagnostic_images)
    print(format_study(study))
    print(json.dumps({"study": f"{ns.out}/study.md"}))
    return 0
