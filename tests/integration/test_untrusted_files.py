"""A checkpoint or weights file from someone else never runs code: a pickle that calls ``os.system`` goes through
every entry point that reads such a file; its marker never appears and the error is one line naming the file."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.cli import main
from ovseg.utils.io import load_weights_file

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/maskclip.yaml")


class _RunsCode:
    """Unpickling this runs a shell command (what a malicious ``.pth`` does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path):
    """(malicious checkpoint, the file its code would create)."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "model": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)},
               path)
    return path, marker


def _entry_points(evil_path: Path, root: Path, images: Path, out: Path) -> dict[str, list[str]]:
    e = str(evil_path)
    test = ["test", "--config", TINY, "--data.root", str(root), "--data.datasets", "[voc21]",
            "--trainer.default_root_dir", str(out)]
    return {
        "weights convert-pixelclip": ["weights", "convert-pixelclip", e, str(out / "converted.ckpt")],
        "test --ckpt_path": [*test, "--ckpt_path", e],
        "fit --ckpt_path": ["fit", "--config", str(REPO / "configs/tiny/pixelclip.yaml"), "--data.root", str(root),
                            "--trainer.default_root_dir", str(out), "--ckpt_path", e],
        "predict --ckpt_path": ["predict", "--config", TINY, "--images", str(images), "--classes", "cat,dog",
                                "--trainer.default_root_dir", str(out), "--ckpt_path", e],
        "probe checkpoint": ["test", "--config", str(REPO / "configs/tiny/clips4_knn.yaml"), "--data.root", str(root),
                             "--trainer.default_root_dir", str(out), "--model.init_args.checkpoint", e],
        "clip.pretrained file": [*test, "--model.init_args.clip.pretrained", e],
        "folds run": ["folds", "run", "--root", str(root), "--out", str(out), "--ckpts", e, e, e, e],
        "masks sam": ["masks", "sam", "--images", str(images), "--out", str(out / "m"), "--checkpoint", e,
                      "--model-type", "vit_b", "--device", "cpu"],
        "masks dino": ["masks", "dino", "--images", str(images), "--out", str(out / "m"), "--weights", e,
                       "--device", "cpu"],
    }


ENTRY_POINTS = ["weights convert-pixelclip", "test --ckpt_path", "fit --ckpt_path", "predict --ckpt_path",
                "probe checkpoint", "clip.pretrained file", "folds run", "masks sam", "masks dino"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_malicious_pickle_never_runs(entry, evil, synthetic_root, tmp_path, monkeypatch, capsys):
    if entry == "masks sam":
        pytest.importorskip("segment_anything")
    evil_path, marker = evil
    images = tmp_path / "photos"
    images.mkdir()
    Image.fromarray(np.full((20, 20, 3), 99, np.uint8)).save(images / "a.png")
    argv = _entry_points(evil_path, synthetic_root, images, tmp_path / "out")[entry]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ovseg", *argv])
    assert main() == 1  # the shell path: user errors are one line
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ovseg: error:")]
    assert len(errors) == 1 and str(evil_path) in errors[0] and "posix.system" in errors[0], errors
    assert not marker.exists()


def test_deeplab_weights_file_never_runs_code(evil):
    from ovseg.models.deeplab import DeepLabResNet

    evil_path, marker = evil
    with pytest.raises(ValueError, match=f"{evil_path}: refusing to load the ResNet weights file"):
        DeepLabResNet(weights=str(evil_path), embed_dim=8)
    assert not marker.exists()


def test_numpy_values_load_only_where_allowed(tmp_path):
    # detectron2 checkpoints (the authors' PixelCLIP release) store numpy scalars and arrays next to the tensors
    path = tmp_path / "d2.pth"
    torch.save({"model": {"w": torch.ones(2), "pixel_mean": np.array([1.0, 2.0])}, "iteration": np.int64(7)}, path)
    loaded = load_weights_file(path, allow_numpy=True)
    assert loaded["iteration"] == 7 and np.array_equal(loaded["model"]["pixel_mean"], [1.0, 2.0])
    with pytest.raises(ValueError, match="refusing to load"):
        load_weights_file(path)
