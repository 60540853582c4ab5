"""Bad SA-1B training data is never dropped silently (issue 26 §4): garbage RLE strings are found when a sample is
read (the lazy crop decode would never decode them), images over PIL's size limit are skipped and counted, images
without their JSON are logged and counted, and backup copies of a tar or image (samples trained twice) are refused."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from ovseg.data.files import DataError, read_image
from ovseg.data.sa1b import check_rle_counts, decode_masks, encode_mask, write_sa1b_tars, write_synthetic_sa1b
from ovseg.methods.pixelclip.data import SA1B

SMALL = dict(resize_short=40, crop_size=32, mask_resolution=16)


def _garble(json_path, annotation: int = 0, counts: str = "0k1O2") -> None:
    record = json.loads(json_path.read_text())
    record["annotations"][annotation]["segmentation"]["counts"] = counts
    json_path.write_text(json.dumps(record))


@pytest.mark.parametrize("counts", ["0k1O2", "PPPPPPP", "\u00e9t\u00e9", "", "1"])
def test_a_garbage_rle_is_found_when_the_sample_is_read(tmp_path, caplog, counts):
    paths = write_synthetic_sa1b(tmp_path, num_images=3, seed=4)
    bad = paths[1].with_suffix(".json")
    _garble(bad, counts=counts)
    strict = SA1B(folder=str(tmp_path), skip_bad=False, mask_decoding="crop", **SMALL).build(tmp_path)
    with pytest.raises(DataError, match="RLE .*mask 0") as info:
        strict[1]
    assert str(bad) in str(info.value)
    lenient = SA1B(folder=str(tmp_path), mask_decoding="crop", **SMALL).build(tmp_path)
    with caplog.at_level(logging.WARNING):
        samples = [lenient[i] for i in range(3)]
    assert lenient.skipped == 1 and "skipped" in samples[1] and str(paths[1]) in caplog.text


def test_rle_check_agrees_with_pycocotools(tmp_path):
    rng = np.random.default_rng(0)
    masks = rng.random((4, 9, 13)) < 0.4
    rles = [encode_mask(m) for m in masks]
    check_rle_counts([r["counts"] for r in rles], 9, 13)  # pycocotools' own strings pass
    assert np.array_equal(decode_masks(rles, 9, 13), masks)
    with pytest.raises(DataError, match="covers"):
        check_rle_counts([r["counts"] for r in rles], 9, 14)


def test_an_image_over_pils_size_limit_is_one_line_and_skipped(tmp_path, monkeypatch, caplog):
    paths = write_synthetic_sa1b(tmp_path, num_images=2, size=(48, 64), seed=1)
    Image.fromarray(np.zeros((120, 160, 3), np.uint8)).save(paths[0])  # its masks no longer fit either way
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 120 x 160 is over twice the limit: PIL refuses it
    with pytest.raises(DataError, match=f"{paths[0]}: image too large to read"):
        read_image(paths[0])
    dataset = SA1B(folder=str(tmp_path), **SMALL).build(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert "skipped" in dataset[0] and dataset.skipped == 1


def test_images_without_their_json_in_a_tar_are_logged_and_counted(tmp_path, caplog):
    write_synthetic_sa1b(tmp_path / "extracted", num_images=4, images_per_tar=2)
    (tmp_path / "extracted/sa_000000/sa_1.json").unlink()
    shards = write_sa1b_tars(tmp_path / "extracted", tmp_path / "tars")
    with caplog.at_level(logging.WARNING, logger="ovseg.data.sa1b"):
        dataset = SA1B(folder="tars", **SMALL).build(tmp_path)
    assert len(dataset) == 3 and dataset.left_out == 1
    assert f"{shards[0]}: 1 image(s) without a mask JSON" in caplog.text


def test_a_backup_copy_of_a_tar_or_an_image_is_refused(tmp_path):
    write_synthetic_sa1b(tmp_path / "extracted", num_images=4, images_per_tar=2)
    shards = write_sa1b_tars(tmp_path / "extracted", tmp_path / "tars")
    (tmp_path / "tars/backup").mkdir()
    shutil.copy2(shards[0], tmp_path / "tars/backup" / shards[0].name)
    with pytest.raises(DataError, match="look like copies of one tar .*would train twice"):
        SA1B(folder="tars", **SMALL).build(tmp_path)
    shutil.copytree(tmp_path / "extracted/sa_000000", tmp_path / "extracted/old/sa_000000")
    with pytest.raises(DataError, match="sa_1.jpg look like copies of one image"):
        SA1B(folder="extracted", **SMALL).build(tmp_path)


def test_an_epoch_without_any_mask_stops_the_run():
    import lightning as L

    from ovseg.methods.pixelclip import PixelCLIP
    from ovseg.models.clip import CLIPConfig

    model = PixelCLIP(clip=CLIPConfig(name="tiny-vit", pretrained=None), clip_resolution=64, mask_resolution=32,
                      num_clusters=8)
    model.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    model.on_train_epoch_start()
    model._masks_this_epoch = 3
    model.on_train_epoch_end()  # masks seen: fine
    model.on_train_epoch_start()
    with pytest.raises(DataError, match="no mask in any training crop of epoch 0"):
        model.on_train_epoch_end()
