"""``ovseg predict`` on the images users have (issue 26 §5): 16-bit grey PNGs scaled, EXIF orientation applied,
.gif read, macOS ``._`` files and the run's own earlier outputs left out; ``--classes`` files of any name, with a
BOM, names differing in case only, a Latin-1 file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.cli import main
from ovseg.data.classnames import parse_class_list
from ovseg.data.files import read_image

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/maskclip.yaml")


def test_a_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode.startswith("I")
    image = read_image(tmp_path / "depth.png")
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    assert np.array_equal(image[..., 0], [[0, 64], [128, 255]]) and (image == image[..., :1]).all()


def test_exif_orientation_is_applied_only_when_asked(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    assert read_image(tmp_path / "photo.jpg").shape == (20, 40, 3)  # as stored (dataset readers: their protocol)
    shown = read_image(tmp_path / "photo.jpg", exif_orientation=True)
    assert shown.shape == (40, 20, 3) and shown[:20].mean() > 200 and shown[20:].mean() < 50  # white on top


def test_predict_reads_what_a_user_has_and_never_its_own_outputs(tmp_path, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(photos / "anim.gif")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(photos / "phone.jpg", exif=exif)
    Image.fromarray((rng.integers(0, 65535, (16, 16))).astype(np.uint16)).save(photos / "scan.png")
    (photos / "._phone.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    (photos / "notes.md").write_text("not an image")
    args = ["predict", "--config", TINY, "--images", str(photos), "--classes", "cat,dog",
            "--model.init_args.predict_dir", str(photos / "predictions"), "--trainer.default_root_dir",
            str(tmp_path), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    with caplog.at_level(logging.WARNING):
        main(args)
    labels = {p.name: np.asarray(Image.open(p)).shape for p in (photos / "predictions").glob("*_label.png")}
    assert labels == {"anim_label.png": (24, 32), "phone_label.png": (30, 20), "scan_label.png": (16, 16)}
    assert "macOS metadata" in caplog.text and "not an image" in caplog.text
    main(args)  # again: the pictures of the first run, inside the image folder, are not predicted
    assert sorted(p.name for p in (photos / "predictions").iterdir()) == sorted(
        f"{stem}_{kind}.png" for stem in ("anim", "phone", "scan") for kind in ("label", "overlay"))


def test_class_files_of_any_name_bom_case_and_encoding(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "names.csv").write_text("cat\ndog, puppy\n", encoding="utf-8")
    assert parse_class_list("names.csv") == [["cat"], ["dog", "puppy"]]  # not one class called "names.csv"
    (tmp_path / "bom.txt").write_bytes("\ufeffcat\nsky\n".encode("utf-8"))
    assert parse_class_list("bom.txt") == [["cat"], ["sky"]]
    with pytest.raises(ValueError, match="'Cat' / 'cat' is given twice"):
        parse_class_list("Cat,cat")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\nchien\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt: not UTF-8 text"):
        parse_class_list("latin.txt")
    assert parse_class_list("st. bernard") == [["st. bernard"]]  # an inline name with a dot stays a name
