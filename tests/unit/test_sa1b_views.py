"""The fast SA-1B mask path (decode only the masks and columns a crop needs, one gather for resize, crop, flip and
cutout) against a straightforward reference of the same semantics: decode every mask at full size with pycocotools,
sort by area, resize-and-crop, flip, clear the cutout, drop emptied masks, nearest-resize — bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from ovseg.data.files import DataError
from ovseg.data.sa1b import MaskRecord, decode_rle_columns, decode_rle_grid, encode_mask, write_synthetic_sa1b
from ovseg.methods.pixelclip.data import SA1B, PixelCLIPViews, pil_nearest_index, ssd_color_augment


# -- the reference: every mask decoded at full size, then the steps one by one --------------------------------------
def reference_masks(json_path, height, width) -> np.ndarray:
    anns = [a for a in json.loads(json_path.read_text())["annotations"] if not a.get("iscrowd", 0)]
    rles = [{"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()} for a in anns]
    masks = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
    return masks[np.argsort(-masks.reshape(len(masks), -1).sum(1), kind="stable")]


def reference_views(views: PixelCLIPViews, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> dict:
    size = (views.crop_size, views.crop_size)
    height, width = image.shape[:2]
    if views.resize_library == "pil":
        rh, rw = views.resized_shape(height, width)
        y0, x0, ch, cw = views.crop_offset(rh, rw, rng)
        weak = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))[y0:y0 + ch, x0:x0 + cw]
        # the masks resized in full with PIL's nearest rule, then cropped
        full_rows, full_cols = pil_nearest_index(height, rh), pil_nearest_index(width, rw)
        crop = torch.from_numpy(masks[:, full_rows][:, :, full_cols][:, y0:y0 + ch, x0:x0 + cw].astype(np.uint8))
        if (ch, cw) != size:
            import cv2

            weak = cv2.resize(np.ascontiguousarray(weak), size, interpolation=cv2.INTER_LINEAR)
            crop = F.interpolate(crop[None], size=size, mode="nearest")[0]
    else:
        import cv2

        x0, y0, x1, y1 = views.crop_window(height, width, rng)
        weak = cv2.resize(np.ascontiguousarray(image[y0:y1, x0:x1]), size, interpolation=cv2.INTER_LINEAR)
        crop = F.interpolate(torch.from_numpy(masks[:, y0:y1, x0:x1].astype(np.uint8))[None], size=size,
                             mode="nearest")[0]
    weak = np.ascontiguousarray(weak)
    if views.ssd_color:
        weak = ssd_color_augment(weak, rng)
    flip = rng.random() < views.flip_prob
    if flip:
        weak, crop = np.ascontiguousarray(weak[:, ::-1]), crop.flip(-1)
    views.photometric.set_random_seed(int(rng.integers(0, 2**31 - 1)))
    strong = views.photometric(image=weak)["image"].copy()
    cut = views.cutout_box(rng)
    strong[cut[1]:cut[3], cut[0]:cut[2]] = 0
    crop[:, cut[1]:cut[3], cut[0]:cut[2]] = 0
    crop = crop[crop.flatten(1).amax(dim=1) > 0]
    res = views.mask_resolution or views.crop_size
    if res != views.crop_size and len(crop):
        crop = F.interpolate(crop[None], size=(res, res), mode="nearest")[0]
    crop = crop.reshape(-1, res, res)
    return {"image": weak, "image_strong": strong, "cutout": cut, "masks": crop.bool()}


def _add_awkward_masks(json_path, height, width):
    """Zero-area, single-pixel corner, full-image and one-column masks beside the generated ones."""
    record = json.loads(json_path.read_text())
    extra = [np.zeros((height, width), bool) for _ in range(4)]
    extra[1][0, 0] = True
    extra[2][:] = True
    extra[3][:, width - 1] = True
    for mask in extra:
        record["annotations"].append({"segmentation": encode_mask(mask), "area": int(mask.sum())})
    json_path.write_text(json.dumps(record))


def _draws(views: PixelCLIPViews, paths, height: int, width: int, seeds: int):
    """(ours, reference, dense, all masks) per image and seed: the crop-decoding path on the image's MaskRecord, the
    reference on pycocotools' full decode, and the views on the full decode given as arrays."""
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        record = MaskRecord.read(path.with_suffix(".json"), height, width)
        full = reference_masks(path.with_suffix(".json"), height, width)
        for seed in range(seeds):
            yield (views(image, record, np.random.default_rng(seed)),
                   reference_views(views, image, full, np.random.default_rng(seed)),
                   views(image, full, np.random.default_rng(seed)), full)


@pytest.mark.parametrize("settings", [
    dict(resize_short=80, crop_size=64, mask_resolution=24),                 # upsampled crop, masks at 24
    dict(resize_short=40, crop_size=32, mask_resolution=None),               # downsampled crop, masks at the crop
    dict(resize_short=64, crop_size=64, mask_resolution=64, resize_long_max=90),  # long side capped: crop > side
    dict(resize_short=80, crop_size=64, mask_resolution=24, resize_library="cv2"),
    dict(resize_short=64, crop_size=64, mask_resolution=64, resize_long_max=90, resize_library="cv2"),
])
def test_crop_decoding_equals_the_full_decode_reference(tmp_path, settings):
    paths = write_synthetic_sa1b(tmp_path, num_images=3, size=(60, 150), masks_per_image=(15, 25), seed=1,
                                 mask_extent=(0.02, 0.4))
    for path in paths:
        _add_awkward_masks(path.with_suffix(".json"), 60, 150)
    checked = {"dropped": 0, "cut": 0}
    for ours, ref, dense, full in _draws(PixelCLIPViews(**settings), paths, 60, 150, seeds=12):
        assert np.array_equal(ours["image"].numpy().transpose(1, 2, 0), ref["image"])
        assert np.array_equal(ours["image_strong"].numpy().transpose(1, 2, 0), ref["image_strong"])
        assert tuple(ours["cutout"].tolist()) == ref["cutout"]
        assert ours["masks"].dtype == torch.bool and ours["masks"].shape == ref["masks"].shape
        assert torch.equal(ours["masks"], ref["masks"])
        assert torch.equal(dense["masks"], ref["masks"])  # masks given as arrays: the same
        checked["dropped"] += len(ref["masks"]) < len(full)
        checked["cut"] += ref["cutout"][2] > ref["cutout"][0]
    assert checked["dropped"] > 0 and checked["cut"] > 0


def test_cv2_views_of_an_image_whose_capped_short_side_is_below_the_crop(tmp_path):
    """200x700 at the defaults (short side 1024, long side capped at 1333, crop 640): the resized image is 381x1333,
    so the crop takes its whole height and a 640-wide stretch, stretched to 640x640 (it raised ValueError before,
    which skip_bad did not catch)."""
    scale = 1333 / 700
    views = PixelCLIPViews(resize_library="cv2")
    for seed in range(6):
        x0, y0, x1, y1 = views.crop_window(200, 700, np.random.default_rng(seed))
        assert (y0, y1) == (0, 200) and 0 <= x0 < x1 <= 700 and abs((x1 - x0) - 640 / scale) <= 1
    # through the dataset: a band over rows 50-99 comes out over rows 64-127 of 256, in every view
    image_path = tmp_path / "sa_0" / "sa_1.jpg"
    image_path.parent.mkdir()
    Image.fromarray(np.full((200, 700, 3), 90, np.uint8)).save(image_path)
    band = np.zeros((200, 700), bool)
    band[50:100] = True
    image_path.with_suffix(".json").write_text(json.dumps({"annotations": [{"segmentation": encode_mask(band)}]}))
    dataset = SA1B(folder=str(tmp_path), resize_library="cv2", skip_bad=False, cutout_prob=0.0).build(tmp_path)
    for seed in range(3):
        np.random.seed(seed)
        sample = dataset[0]
        assert sample["image"].shape == (3, 640, 640) and sample["masks"].shape == (1, 256, 256)
        assert sample["masks"][0].any(dim=1).nonzero().flatten().tolist() == list(range(64, 128))
        assert sample["masks"][0, 64:128].all()


def test_flip_and_no_cutout_paths(tmp_path):
    paths = write_synthetic_sa1b(tmp_path, num_images=2, size=(50, 70), masks_per_image=(10, 10), seed=2)
    for flip_prob, cutout_prob in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        views = PixelCLIPViews(resize_short=64, crop_size=48, mask_resolution=16, flip_prob=flip_prob,
                               cutout_prob=cutout_prob)
        for ours, ref, dense, _ in _draws(views, paths, 50, 70, seeds=5):
            assert torch.equal(ours["masks"], ref["masks"]) and torch.equal(dense["masks"], ref["masks"])


def _rle_masks(rng: np.random.Generator, height: int, width: int, densities: tuple[float, ...], boxes: int):
    """RLE counts of noise masks of the given densities and of random boxes, and pycocotools' decode [N, H, W]."""
    masks = [rng.random((height, width)) < p for p in densities]
    for _ in range(boxes):
        mask = np.zeros((height, width), bool)
        y, x = rng.integers(0, height), rng.integers(0, width)
        mask[y:y + rng.integers(1, height - 6), x:x + rng.integers(1, width - 12)] = True
        masks.append(mask)
    counts = [encode_mask(m)["counts"].encode() for m in masks]
    return counts, mask_utils.decode([{"size": [height, width], "counts": c} for c in counts]).transpose(2, 0, 1)


def test_rle_column_decoding_matches_pycocotools():
    height, width = 37, 53
    counts, full = _rle_masks(np.random.default_rng(0), height, width, (0.0, 0.02, 0.5, 0.98, 1.0), boxes=10)
    for start, stop in ((0, width), (0, 1), (width - 1, width), (11, 29), (20, 20)):
        block = decode_rle_columns(counts, height, width, start, stop)
        assert block.shape == (len(full), stop - start, height)
        assert np.array_equal(block.transpose(0, 2, 1), full[:, :, start:stop])
    # long runs need several 5-bit groups and negative differences: a big image
    big = np.zeros((700, 1100), bool)
    big[100:650, 3:1000] = True
    big[5, :] = True
    count = encode_mask(big)["counts"].encode()
    assert np.array_equal(decode_rle_columns([count], 700, 1100, 0, 1100)[0].T, big)


def test_rle_grid_decoding_matches_pycocotools_on_row_and_column_subsets():
    """Every other row and column (a mask halved at read time), irregular subsets, single rows and columns."""
    rng = np.random.default_rng(1)
    height, width = 41, 58
    counts, full = _rle_masks(rng, height, width, (0.0, 0.03, 0.5, 1.0), boxes=8)
    subsets = [np.arange(0, 41, 2), np.arange(1, 41, 2), np.sort(rng.choice(41, 13, replace=False)), np.array([40])]
    for rows in subsets:
        for cols in (np.arange(0, 58, 2), np.arange(9, 30, 3), np.sort(rng.choice(58, 20, replace=False)),
                     np.array([0]), np.arange(58)):
            block = decode_rle_grid(counts, height, width, cols, rows)
            assert block.shape == (len(full), len(cols), len(rows))
            assert np.array_equal(block.transpose(0, 2, 1), full[:, rows][:, :, cols])


def test_a_mask_halved_at_read_time_is_decoded_at_the_halved_size(tmp_path):
    """With ``downscale`` the crop's block is decoded at the image's (halved) size, not at the RLE's and then
    subsampled: a quarter of the pixels, as cheap as masks halved ahead of time."""
    from ovseg.data.sa1b import cv2_nearest_index

    write_synthetic_sa1b(tmp_path, num_images=1, size=(61, 90), masks_per_image=(9, 9), seed=5)
    path = next(tmp_path.rglob("*.json"))
    record = MaskRecord.read(path, 61, 90)
    record.pixel_rows, record.pixel_cols = cv2_nearest_index(61, 31), cv2_nearest_index(90, 45)
    halved = record.decode_at_image_size()  # largest first: every mask decoded, then nearest-resized
    order = record.largest_first()
    for start, stop in ((0, 45), (7, 30), (44, 45)):
        block = record.decode_columns(order, start, stop)
        assert block.shape == (9, 31, stop - start)
        assert np.array_equal(block, halved[:, :, start:stop])


def test_rle_covering_the_wrong_size_raises_naming_the_source():
    count = encode_mask(np.ones((4, 5), bool))["counts"].encode()
    with pytest.raises(DataError, match="x.json: RLE of mask 0 covers 20 pixels, the image has 30"):
        decode_rle_columns([count], 5, 6, 0, 6, source="x.json")


def test_masks_are_taken_largest_first_from_the_rle_areas(tmp_path):
    masks = np.zeros((4, 10, 12), dtype=bool)
    masks[0, :2, :2] = True
    masks[1, :, :3] = True
    masks[2, :5, :5] = True
    masks[3, 5:, 7:] = True  # same area as masks[2]: file order kept
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"annotations": [{"segmentation": encode_mask(m)} for m in masks]}))
    record = MaskRecord.read(path, 10, 12)
    assert record.largest_first().tolist() == [1, 2, 3, 0]
    assert np.array_equal(record.decode(), masks[[1, 2, 3, 0]])


def test_downscale_at_read_time_equals_ovseg_masks_downscale(tmp_path):
    from ovseg.tools.masks import downscale_folder

    write_synthetic_sa1b(tmp_path / "full", num_images=2, size=(61, 90), masks_per_image=(8, 8), seed=3)
    downscale_folder(tmp_path / "full", tmp_path / "half", progress=False)
    settings = dict(resize_short=40, crop_size=30, mask_resolution=None, ssd_color=False, strong=False)
    on_the_fly = SA1B(folder=str(tmp_path / "full"), downscale=0.5, **settings).build(tmp_path)
    ahead = SA1B(folder=str(tmp_path / "half"), **settings).build(tmp_path)
    for index in range(2):
        np.random.seed(index)
        a = on_the_fly[index]
        np.random.seed(index)
        b = ahead[index]
        # same masks (the order of equal-area masks may differ: areas are counted at different sizes)
        ours = sorted(m.numpy().tobytes() for m in a["masks"])
        theirs = sorted(m.numpy().tobytes() for m in b["masks"])
        assert ours == theirs and len(ours) > 0
        # the images differ only by the ahead-of-time JPEG re-encoding (same geometry: same crop)
        assert a["image"].shape == b["image"].shape
        assert (a["image"].float() - b["image"].float()).abs().mean() < 12  # noise images: JPEG at its worst
