"""`ovseg test` / `ovseg predict` end to end on synthetic data in the real layouts, tiny random CLIP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.cli import main
from ovseg.data.seg_dataset import SegFileDataset
from ovseg.data.synthetic import write_synthetic
from ovseg.eval.metrics import scores_from_confusion

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/maskclip.yaml")
TINY_SCLIP = str(REPO / "configs/tiny/clip.yaml")


def run_test(root, out, config=TINY, datasets="[voc21,voc20,ade150]", extra=()):
    main(["test", "--config", config, "--data.root", str(root), "--data.datasets", datasets,
          "--model.init_args.results_dir", str(out), "--trainer.default_root_dir", str(out),
          "--trainer.logger.init_args.save_dir", str(out), *extra])
    return json.loads((Path(out) / "results.json").read_text())


def test_results_files_and_label_conventions(synthetic_root, tmp_path):
    results = run_test(synthetic_root, tmp_path / "res")
    assert (tmp_path / "res/results.md").read_text().startswith("# MaskCLIP")
    assert set(results) >= {"method", "weights", "ovseg_version", "world_size", "config", "datasets"}
    assert results["weights"] == "tiny-vit/random" and results["world_size"] == 1
    for name in ("voc21", "voc20", "ade150"):
        d = results["datasets"][name]
        cm = np.array(d["confusion_matrix"])
        ds = SegFileDataset(name, synthetic_root)
        labels = [ds.load_label(i) for i in range(len(ds))]
        # total = non-ignored pixels under this dataset's convention; rows = ground truth
        assert cm.sum() == sum(int((lab != 255).sum()) for lab in labels)
        gt_hist = np.bincount(np.concatenate([lab[lab != 255] for lab in labels]), minlength=ds.num_classes)
        np.testing.assert_array_equal(cm.sum(axis=1), gt_hist)
        scores = scores_from_confusion(cm)
        assert d["mIoU"] == pytest.approx(round(scores.mIoU, 2))
        assert d["num_images"] == len(ds) and len(d["class_names"]) == ds.num_classes == len(d["per_class"])
        assert d["protocol"] == "maskclip" and d["protocol_settings"]["templates"] == "single"
    # voc21 scores the background class, voc20 ignores it
    voc21 = np.array(results["datasets"]["voc21"]["confusion_matrix"])
    voc20 = np.array(results["datasets"]["voc20"]["confusion_matrix"])
    assert voc21.shape == (21, 21) and voc20.shape == (20, 20)
    background = sum(int((SegFileDataset("voc21", synthetic_root).load_label(i) == 0).sum()) for i in range(3))
    assert background > 0 and voc21.sum() - voc20.sum() == background


def test_sclip_protocol_slide_and_thresholds_run(synthetic_root, tmp_path):
    results = run_test(synthetic_root, tmp_path / "res", config=TINY_SCLIP, datasets="[voc21]")
    d = results["datasets"]["voc21"]
    assert d["protocol_settings"]["mode"] == "slide" and d["protocol_settings"]["prob_threshold"] == 0.1
    assert d["class_names_source"] == "sclip/voc21" and "sky" in d["class_names"][0]


def test_failed_run_keeps_previous_results_intact(synthetic_root, tmp_path):
    out = tmp_path / "res"
    run_test(synthetic_root, out, datasets="[voc21]")
    before = (out / "results.json").read_bytes()
    ds = SegFileDataset("voc21", synthetic_root)
    ds.samples[-1][1].write_bytes(b"corrupt")
    with pytest.raises(Exception, match="cannot decode image"):
        run_test(synthetic_root, out, datasets="[voc21]")
    assert (out / "results.json").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_missing_weights_file_is_named(synthetic_root, tmp_path):
    # jsonargparse re-raises instantiation errors as ValueError; the message keeps ours
    with pytest.raises((FileNotFoundError, ValueError), match="weights file not found: /nonexistent/weights.bin"):
        run_test(synthetic_root, tmp_path / "res", datasets="[voc21]",
                 extra=["--model.init_args.clip.pretrained", "/nonexistent/weights.bin"])


def test_predict_writes_label_png_and_overlay(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 60), (70, 50)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"p{i}.jpg")
    out = tmp_path / "pred"
    main(["predict", "--config", TINY, "--images", str(images), "--classes", "cat,dog;puppy,sky",
          "--model.init_args.predict_dir", str(out), "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger", "false"])
    for i, size in enumerate([(40, 60), (70, 50)]):
        label = np.asarray(Image.open(out / f"p{i}_label.png"))
        assert label.shape == size and label.max() < 3
        overlay = Image.open(out / f"p{i}_overlay.png")
        assert overlay.height >= size[0] and overlay.width > size[1]  # legend beside the image


def _subprocess_test(root, out, devices):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ovseg", "test", "--config", TINY, "--data.root", str(root),
           "--data.datasets", "[voc21,ade150]", "--model.init_args.results_dir", str(out),
           "--trainer.logger.init_args.save_dir", str(out), "--trainer.devices", str(devices)]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(out) / "results.json").read_text())


@pytest.mark.ddp
def test_one_and_two_processes_give_identical_confusion_matrices(tmp_path):
    root = tmp_path / "data"
    write_synthetic("voc21", root, num_images=5, seed=4)  # odd: ranks get 3 and 2 images
    write_synthetic("ade150", root, num_images=3, seed=5)
    single = _subprocess_test(root, tmp_path / "one", 1)
    double = _subprocess_test(root, tmp_path / "two", 2)
    assert double["world_size"] == 2 and single["world_size"] == 1
    for name in ("voc21", "ade150"):
        assert double["datasets"][name]["confusion_matrix"] == single["datasets"][name]["confusion_matrix"]
        assert double["datasets"][name]["num_images"] == single["datasets"][name]["num_images"]


def test_console_errors_are_one_line_and_name_the_file(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("OVSEG_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "ovseg", "test", "--config", TINY, "--data.root", str(tmp_path / "missing"),
         "--trainer.logger", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "ovseg: error: dataset 'voc21' (val): image folder" in proc.stderr
    assert str(tmp_path / "missing") in proc.stderr and "Traceback" not in proc.stderr
