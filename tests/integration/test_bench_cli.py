"""`ovseg bench run` end to end with the tiny random CLIP on synthetic
data; the result pictures with the CSV logger and with wandb (offline)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import ovseg.bench.suite_runner as suite_module
from ovseg.cli import main
from ovseg.data.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic("voc21", root, num_images=2, size=(40, 56), seed=3)
    return root


def test_suite_resume_reruns_only_the_missing_entry(voc_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "suite": "two", "output": str(out), "vars": {"data_root": "unused"},
        "defaults": {"data.init_args.root": "${data_root}", "trainer.enable_progress_bar": False,
                     "model.init_args.gallery_size": 1},
        "entries": [
            {"name": "maskclip", "config": "configs/tiny/maskclip.yaml",
             "overrides": {"data.init_args.datasets": ["voc21", "voc20"]}},
            {"name": "clip", "config": "configs/tiny/clip.yaml"},
        ]}))
    monkeypatch.chdir(REPO)  # the entries' config paths are relative to the project
    calls = []
    real = suite_module.run_ovseg_test
    monkeypatch.setattr(suite_module, "run_ovseg_test", lambda args, isolate: (calls.append(args), real(args, isolate)))

    assert main(["bench", "run", str(suite), "--data-root", str(voc_root)]) == 0
    assert len(calls) == 3  # maskclip: voc21, voc20; clip: voc21
    first = {e: (out / e / "results.json").stat().st_mtime_ns for e in ("maskclip", "clip")}
    maskclip = json.loads((out / "maskclip/results.json").read_text())
    assert list(maskclip["datasets"]) == ["voc21", "voc20"] and maskclip["bench"]["complete"] is True
    # CSV logger: gallery (image | ground truth | prediction) and per-class IoU chart as PNG files
    media = out / "maskclip/parts/voc20/lightning_logs/version_0/media/voc20"
    assert sorted(p.name for p in media.glob("*.png")) == [
        "gallery_0_2008_000001.png", "gallery_0_2008_000001_pred.png", "per_class_iou.png"]
    # the raw prediction beside each panel: class ids at the label's size (what comparisons are built from)
    label = np.array(Image.open(voc_root / "VOCdevkit/VOC2012/SegmentationClass/2008_000001.png"))
    pred = np.array(Image.open(media / "gallery_0_2008_000001_pred.png"))
    assert pred.shape == label.shape and pred.max() < 20  # voc20: 20 classes, no background

    # lose one entry (as if it never finished): only it runs again
    (out / "clip/results.json").unlink()
    (out / "clip/parts/voc21/results.json").unlink()
    calls.clear()
    assert main(["bench", "run", str(suite), "--data-root", str(voc_root)]) == 0
    assert len(calls) == 1 and f"--model.init_args.results_dir={out / 'clip/parts/voc21'}" in calls[0]
    assert (out / "maskclip/results.json").stat().st_mtime_ns == first["maskclip"]
    assert (out / "clip/results.json").stat().st_mtime_ns != first["clip"]

    calls.clear()
    assert main(["bench", "run", str(suite), "--data-root", str(voc_root)]) == 0
    assert calls == []

    # the report lists these tiny-model results (they match no paper row) instead of dropping them
    assert main(["bench", "report", "--results", str(out), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report/RESULTS.md").read_text()
    assert f"| `{out}/maskclip/results.json` | MaskCLIP | maskclip | tiny-vit/random |" in md
    assert "parts/" not in md


def test_wandb_logger_gets_tables_bar_charts_and_a_gallery(voc_root, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    import ovseg.eval.visualize as visualize

    real = visualize.log_wandb_media
    monkeypatch.setattr(visualize, "log_wandb_media", lambda run, r, g, **kw: logged.append(real(run, r, g, **kw)))
    try:
        main(["test", "--config", str(REPO / "configs/tiny/maskclip.yaml"), "--config",
              str(REPO / "configs/logger/wandb.yaml"), "--data.root", str(voc_root), "--data.datasets", "[voc21]",
              "--model.init_args.results_dir", str(tmp_path / "res"), "--model.init_args.gallery_size", "2",
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    finally:
        if wandb.run is not None:
            wandb.finish()
    assert (tmp_path / "res/results.json").is_file()
    (payload,) = logged
    assert set(payload) == {"test/results", "test/voc21/per_class", "test/voc21/per_class_IoU", "test/voc21/gallery"}
    assert isinstance(payload["test/results"], wandb.Table) and payload["test/results"].columns[2] == "mIoU"
    gallery = payload["test/voc21/gallery"]
    assert gallery.columns == ["id", "image", "ground truth", "prediction"] and len(gallery.data) == 2
    # and the offline run holds them
    media = [p.relative_to(tmp_path).as_posix() for p in (tmp_path / "wandb").rglob("*.json") if "media" in p.parts]
    assert any("test/voc21/gallery" in m for m in media) and any("test/results" in m for m in media)
    assert not (tmp_path / "res/media").exists()  # no file logger: no PNGs
