"""SA-1B source: RLE decoding, two views with the cutout removed from masks, broken files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from ovseg.data.sa1b import decode_masks, encode_mask, load_masks, write_synthetic_sa1b
from ovseg.methods.pixelclip.data import SA1B, PixelCLIPViews, collate_views
from ovseg.data.seg_dataset import DataError

SMALL = dict(resize_short=48, crop_size=40)


def test_synthetic_layout_and_rle_round_trip(tmp_path):
    paths = write_synthetic_sa1b(tmp_path, num_images=3, images_per_tar=2)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "sa_000000/sa_1.jpg", "sa_000000/sa_2.jpg", "sa_000001/sa_3.jpg"]
    record = json.loads(paths[0].with_suffix(".json").read_text())
    assert set(record) == {"image", "annotations"} and isinstance(record["annotations"][0]["segmentation"]["counts"],
                                                                   str)
    rng = np.random.default_rng(0)
    masks = rng.random((3, 20, 30)) > 0.5
    decoded = decode_masks([encode_mask(m) for m in masks], 20, 30)
    assert decoded.dtype == bool and np.array_equal(decoded, masks)


def test_load_masks_sorted_largest_first_crowd_dropped(tmp_path):
    masks = np.zeros((3, 10, 12), dtype=bool)
    masks[0, :2, :2] = True
    masks[1, :, :] = True
    masks[2, :5, :5] = True
    anns = [{"segmentation": encode_mask(m), "iscrowd": int(i == 1)} for i, m in enumerate(masks)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"image": {}, "annotations": anns}))
    loaded = load_masks(path, 10, 12)
    assert np.array_equal(loaded, masks[[2, 0]])


def test_views_cutout_removed_from_every_mask(tmp_path):
    write_synthetic_sa1b(tmp_path, num_images=4, full_cover=True)
    dataset = SA1B(folder=str(tmp_path), mask_resolution=None, **SMALL).build(tmp_path)
    for index in range(4):
        sample = dataset[index]
        x0, y0, x1, y1 = sample["cutout"].tolist()
        assert x1 > x0 and y1 > y0  # p = 1
        area = (x1 - x0) * (y1 - y0) / 40**2
        assert 0.01 * 0.9 <= area <= 0.25  # U(0.1, 0.5) x U(0.1, 0.5) of the crop
        masks = sample["masks"]
        assert masks.shape[1:] == (40, 40) and len(masks) > 0
        assert not masks[:, y0:y1, x0:x1].any()
        assert masks.flatten(1).any(1).all()  # masks emptied by the crop/cutout are dropped
        assert (sample["image_strong"][:, y0:y1, x0:x1] == 0).all()
        outside = torch.ones(40, 40, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert masks.any(0)[outside].all()  # full-cover masks still cover everything else


def test_views_keep_masks_aligned_with_the_image():
    # image: white inside the mask, black outside; geometry only (no colour, no strong view)
    height, width = 60, 80
    mask = np.zeros((height, width), dtype=bool)
    mask[10:35, 20:70] = True
    image = np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    for flip in (0.0, 1.0):
        views = PixelCLIPViews(resize_short=120, crop_size=100, ssd_color=False, strong=False, flip_prob=flip,
                               mask_resolution=None)
        out = views(image, mask[None], np.random.default_rng(3))
        bright = out["image"][0] > 127
        assert out["masks"].shape == (1, 100, 100)
        agree = (bright == out["masks"][0]).float().mean()
        assert agree > 0.98, float(agree)


def test_masks_resized_to_mask_resolution_and_collated(tmp_path):
    write_synthetic_sa1b(tmp_path, num_images=2)
    source = SA1B(folder=str(tmp_path), mask_resolution=16, **SMALL)
    dataset = source.build(tmp_path)
    batch = source.collate([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 40, 40) and batch["image"].dtype == torch.uint8
    assert batch["image_strong"].shape == (2, 3, 40, 40)
    assert [m.shape[1:] for m in batch["masks"]] == [(16, 16), (16, 16)]


def _break(tmp_path, kind: str):
    paths = write_synthetic_sa1b(tmp_path, num_images=3)
    bad = paths[1].with_suffix(".json")
    if kind == "corrupt":
        bad.write_text('{"annotations": [')
    elif kind == "size":
        record = json.loads(bad.read_text())
        record["annotations"][0]["segmentation"] = encode_mask(np.ones((5, 5), dtype=bool))
        bad.write_text(json.dumps(record))
    elif kind == "empty":
        bad.write_text(json.dumps({"image": {}, "annotations": []}))
    return bad


@pytest.mark.parametrize("kind,message", [("corrupt", "cannot parse mask JSON"), ("size", "has RLE size \\[5, 5\\]"),
                                          ("empty", "zero masks")])
def test_broken_json_raises_naming_the_file(tmp_path, kind, message):
    bad = _break(tmp_path, kind)
    dataset = SA1B(folder=str(tmp_path), skip_bad=False, **SMALL).build(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        dataset[1]
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("kind", ["corrupt", "size", "empty"])
def test_broken_json_is_skipped_counted_and_logged(tmp_path, caplog, kind):
    bad = _break(tmp_path, kind)
    dataset = SA1B(folder=str(tmp_path), skip_bad=True, **SMALL).build(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ovseg.methods.pixelclip.data"):
        samples = [dataset[i] for i in range(3)]
    assert dataset.skipped == 1
    assert str(bad.with_suffix(".jpg")) in caplog.text and "1 skipped" in caplog.text
    # the batch is built without it: no neighbour stands in (it would be trained on twice); the count travels along
    batch = collate_views(samples)
    assert [m["index"] for m in batch["meta"]] == [0, 2] and batch["skipped"] == 1 and len(batch["image"]) == 2
    with pytest.raises(DataError, match="every sample of a training batch is broken"):
        collate_views([samples[1]])


def test_missing_json_is_counted_and_logged(tmp_path, caplog):
    paths = write_synthetic_sa1b(tmp_path, num_images=3)
    paths[0].with_suffix(".json").unlink()
    with caplog.at_level(logging.WARNING, logger="ovseg.methods.pixelclip.data"):
        dataset = SA1B(folder=str(tmp_path), **SMALL).build(tmp_path)
    assert len(dataset) == 2 and dataset.files.missing == [paths[0]]
    assert "1 image(s) without a mask JSON" in caplog.text and str(paths[0]) in caplog.text
    with pytest.raises(DataError, match="no images with mask JSONs"):
        for p in paths[1:]:
            p.with_suffix(".json").unlink()
        SA1B(folder=str(tmp_path), **SMALL).build(tmp_path)


def test_images_only_source_for_dino_masks(tmp_path):
    paths = write_synthetic_sa1b(tmp_path, num_images=2)
    for p in paths:
        p.with_suffix(".json").unlink()
    sample = SA1B(folder=str(tmp_path), annotations=False, **SMALL).build(tmp_path)[0]
    assert "masks" not in sample and sample["image"].shape == (3, 40, 40)
