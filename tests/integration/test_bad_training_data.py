"""A fit on bad SA-1B data (issue 26 §4): with every mask broken it stops with one line instead of training on
nothing and exiting 0; samples left out when indexing count in ``train/skipped_samples_epoch``."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ovseg.cli import main
from ovseg.data.sa1b import write_synthetic_sa1b
from ovseg.data.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[2]


def _fit_args(root: Path, out: Path) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/tiny/pixelclip.yaml"), "--data.root", str(root),
            "--trainer.default_root_dir", str(out), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1"]


def _data(tmp_path: Path) -> tuple[Path, list[Path]]:
    root = tmp_path / "data"
    images = write_synthetic_sa1b(root / "sa1b", num_images=5, seed=0)
    write_synthetic("voc20", root, num_images=2, seed=2)
    return root, images


def test_every_mask_broken_stops_the_fit_in_one_line(tmp_path, monkeypatch, capsys):
    root, images = _data(tmp_path)
    for image in images:
        record = json.loads(image.with_suffix(".json").read_text())
        for ann in record["annotations"]:
            ann["segmentation"]["counts"] = "PPPPPPP"  # garbage: an empty box, so a crop never decodes it
        image.with_suffix(".json").write_text(json.dumps(record))
    monkeypatch.setattr(sys, "argv", ["ovseg", *_fit_args(root, tmp_path / "runs")])
    assert main() == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ovseg: error:")]
    assert len(errors) == 1 and "broken" in errors[0], errors
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_samples_left_out_when_indexing_are_counted(tmp_path):
    root, images = _data(tmp_path)
    images[0].with_suffix(".json").unlink()  # an image without its JSON: left out when indexing
    main(_fit_args(root, tmp_path / "runs"))
    with open(tmp_path / "runs/lightning_logs/version_0/metrics.csv") as f:
        epoch = [float(r["train/skipped_samples_epoch"]) for r in csv.DictReader(f)
                 if r.get("train/skipped_samples_epoch")]
    assert epoch == [1.0]
