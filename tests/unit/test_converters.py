"""Dataset converters on tiny fake official downloads; expected pixels are written out by hand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.io import savemat

from ovseg.data.classnames import read_class_names
from ovseg.data.specs import voc_palette
from ovseg.tools.convert import CONVERTERS, ConversionError, ConversionWarning, register_all
from ovseg.tools.convert.cityscapes import convert_cityscapes
from ovseg.tools.convert.coco_object import convert_coco_object
from ovseg.tools.convert.coco_stuff import LUT as STUFF_LUT
from ovseg.tools.convert.coco_stuff import USED_RAW_IDS, convert_coco_stuff
from ovseg.tools.convert.pascal_context import (
    SORTED_RAW_IDS,
    check_category_names,
    convert_pascal_context,
    map_raw_ids,
)
from ovseg.tools.convert.voc_aug import convert_voc_aug


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode in ("P", "L"), f"{path}: mode {im.mode}"
        return np.array(im)


def write_png(path: Path, array, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if palette:
        im.putpalette(voc_palette().reshape(-1).tolist())
    im.save(path)


# --------------------------------------------------------------------------------------------------
# Pascal Context
# --------------------------------------------------------------------------------------------------


def rle_compressed(mask) -> dict:
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def rle_uncompressed(mask) -> dict:
    """Column-major run lengths, starting with a (possibly empty) run of zeros -- written independently."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F").tolist()
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(np.shape(mask)), "counts": counts}


def fake_detail_json(path: Path, extra_ann: dict | None = None) -> None:
    a1 = [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]  # aeroplane (raw 2)
    a2 = [[0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]  # wood (raw 458), painted later
    a3 = [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]  # wall (raw 440)
    b1 = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]]  # person (raw 284), uncompressed RLE
    c1 = [[1, 1], [0, 0]]  # door (raw 115)
    c2 = [[0, 0], [1, 0]]  # raw 1: not among the 60 kept ids
    anns = [
        {"id": 10, "image_id": 1, "category_id": 2, "segmentation": rle_compressed(a1)},
        {"id": 11, "image_id": 1, "category_id": 458, "segmentation": rle_compressed(a2)},
        {"id": 12, "image_id": 2, "category_id": 284, "segmentation": rle_uncompressed(b1)},
        {"id": 13, "image_id": 1, "category_id": 440, "segmentation": rle_uncompressed(a3)},
        {"id": 14, "image_id": 3, "category_id": 115, "segmentation": rle_compressed(c1)},
        {"id": 15, "image_id": 3, "category_id": 1, "segmentation": rle_compressed(c2)},
    ]
    if extra_ann:
        anns.append(extra_ann)
    data = {
        "images": [
            {"image_id": 1, "file_name": "2008_000001.jpg", "phase": "train", "height": 4, "width": 5},
            {"image_id": 2, "file_name": "2008_000002.jpg", "phase": "val", "height": 3, "width": 4},
            {"image_id": 3, "file_name": "2008_000003.jpg", "phase": "train", "height": 2, "width": 2},
        ],
        "categories": [
            {"category_id": 2, "name": "aeroplane"},
            {"category_id": 284, "name": "person"},
            {"category_id": 440, "name": "wall"},
        ],
        "annos_segmentation": anns,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# raw id -> PC-60 label, worked out by hand from the sorted list of the 60 kept ids
HAND_LABELS = {0: 0, 2: 1, 115: 24, 284: 37, 440: 56, 458: 59}


def test_pascal_context_hand_labels_match_class_files():
    names60 = [s[0] for s in read_class_names("context60")]
    assert [names60[HAND_LABELS[r]] for r in (0, 2, 115, 284, 440, 458)] == [
        "background", "aeroplane", "door", "person", "wall", "wood"
    ]  # fmt: skip
    assert names60[1:] == [s[0] for s in read_class_names("context59")]
    assert check_category_names() == []  # built-in Detail names agree with context59 order


def test_pascal_context_mapping_equals_mmseg_digitize_on_kept_ids():
    assert len(SORTED_RAW_IDS) == 60 and SORTED_RAW_IDS[0] == 0 and SORTED_RAW_IDS[-1] == 458
    raw = np.array([[0, 2, 115], [284, 440, 458]])
    label, others = map_raw_ids(raw)
    np.testing.assert_array_equal(label, [[0, 1, 24], [37, 56, 59]])
    assert others == []
    # mmseg's formula on every kept id gives the same labels
    mmseg = np.digitize(SORTED_RAW_IDS, SORTED_RAW_IDS, right=True)
    np.testing.assert_array_equal(map_raw_ids(SORTED_RAW_IDS)[0], mmseg)
    np.testing.assert_array_equal(mmseg, np.arange(60))
    # unlisted ids: background (digitize would give 1 for raw 1 and 2 for raw 3)
    label, others = map_raw_ids(np.array([1, 3, 459, 2]))
    np.testing.assert_array_equal(label, [0, 0, 0, 1])
    assert others == [1, 3, 459]
    with pytest.raises(ConversionError, match=r"\[1, 3, 459\]"):
        map_raw_ids(np.array([1, 3, 459, 2]), unlisted="error")


def test_pascal_context_converter(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    (devkit / "VOC2010" / "JPEGImages").mkdir(parents=True)
    json_path = devkit / "VOC2010" / "trainval_merged.json"
    fake_detail_json(json_path)

    with pytest.warns(ConversionWarning, match=r"1 \(1 images\)"):
        summary = convert_pascal_context(devkit)
    assert summary == {"train": 2, "val": 1, "written": 3, "skipped": 0, "unlisted_ids": 1, "name_mismatches": 0}

    out = devkit / "VOC2010" / "SegmentationClassContext"
    np.testing.assert_array_equal(
        read_png(out / "2008_000001.png"),
        [[1, 59, 59, 0, 0], [1, 59, 59, 0, 0], [0, 0, 0, 56, 56], [0, 0, 0, 56, 56]],
    )
    np.testing.assert_array_equal(read_png(out / "2008_000002.png"), [[37, 0, 0, 0], [37, 37, 0, 0], [0, 37, 37, 37]])
    np.testing.assert_array_equal(read_png(out / "2008_000003.png"), [[24, 24], [0, 0]])
    with Image.open(out / "2008_000001.png") as im:
        assert im.mode == "P"
        assert np.array(im.getpalette()[:9]).tolist() == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    sets = devkit / "VOC2010" / "ImageSets" / "SegmentationContext"
    assert (sets / "train.txt").read_text() == "2008_000001\n2008_000003\n"
    assert (sets / "val.txt").read_text() == "2008_000002\n"

    # resumable: existing outputs are kept unless --overwrite
    write_png(out / "2008_000002.png", np.full((3, 4), 7))
    assert convert_pascal_context(devkit, json_path, splits=("val",))["skipped"] == 1
    assert (read_png(out / "2008_000002.png") == 7).all()
    assert convert_pascal_context(devkit, json_path, splits=("val",), overwrite=True)["written"] == 1
    assert read_png(out / "2008_000002.png")[0, 0] == 37

    with pytest.raises(ConversionError, match="2008_000003.*not among the 60"):
        convert_pascal_context(devkit, json_path, overwrite=True, unlisted="error")


def test_pascal_context_name_mismatch_warns(tmp_path):
    json_path = tmp_path / "VOC2010" / "trainval_merged.json"
    fake_detail_json(json_path)
    (tmp_path / "VOC2010" / "JPEGImages").mkdir()
    data = json.loads(json_path.read_text())
    data["categories"][1]["name"] = "people"
    data["annos_segmentation"] = [a for a in data["annos_segmentation"] if a["category_id"] != 1]
    json_path.write_text(json.dumps(data))
    with pytest.warns(ConversionWarning, match="raw id 284 is 'people'"):
        summary = convert_pascal_context(tmp_path, json_path)
    assert summary["name_mismatches"] >= 1


def test_pascal_context_bad_inputs(tmp_path):
    bad = tmp_path / "nosegs.json"
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ConversionError, match=r"nosegs\.json.*annos_segmentation"):
        convert_pascal_context(tmp_path, bad)

    wrong_size = {"id": 99, "image_id": 2, "category_id": 2, "segmentation": rle_compressed(np.ones((4, 5)))}
    json_path = tmp_path / "sizes.json"
    fake_detail_json(json_path, extra_ann=wrong_size)
    with pytest.raises(ConversionError, match=r"sizes\.json.*id 99.*\[4, 5\] differs from image 2008_000002\.jpg"):
        convert_pascal_context(tmp_path, json_path)

    with pytest.raises(ConversionError, match="not found"):
        convert_pascal_context(tmp_path, tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConversionError, match=r"broken\.json.*not valid JSON"):
        convert_pascal_context(tmp_path, tmp_path / "broken.json")


# --------------------------------------------------------------------------------------------------
# VOC aug (SBD)
# --------------------------------------------------------------------------------------------------


def write_mat(path: Path, seg) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    seg = np.asarray(seg, dtype=np.uint8)
    savemat(str(path), {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.unique(seg[seg > 0])}})


def test_voc_aug_converter(tmp_path):
    devkit, sbd = tmp_path / "VOCdevkit", tmp_path / "benchmark_RELEASE"
    sets = devkit / "VOC2012" / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\nb\n")
    (sets / "val.txt").write_text("c\n")
    voc = devkit / "VOC2012" / "SegmentationClass"
    write_png(voc / "a.png", [[0, 1], [255, 20]], palette=True)
    write_png(voc / "b.png", [[15, 15], [0, 255]], palette=True)
    write_png(voc / "c.png", [[3, 3], [3, 0]], palette=True)
    ds = sbd / "dataset"
    ds.mkdir(parents=True)
    (ds / "train.txt").write_text("b\nd\ne\n")
    (ds / "val.txt").write_text("c\nf\n")
    write_mat(ds / "cls" / "b.mat", [[15, 15], [15, 15]])  # VOC's own label of b wins
    write_mat(ds / "cls" / "c.mat", [[1, 1], [1, 1]])
    write_mat(ds / "cls" / "d.mat", [[0, 7, 7], [0, 0, 12]])
    write_mat(ds / "cls" / "e.mat", [[20]])
    write_mat(ds / "cls" / "f.mat", [[2, 0]])

    summary = convert_voc_aug(devkit, sbd)
    assert summary == {"labels": 6, "from_sbd": 3, "from_voc": 3, "skipped": 0, "trainaug": 5, "aug": 3}
    assert (sets / "trainaug.txt").read_text() == "a\nb\nd\ne\nf\n"
    assert (sets / "aug.txt").read_text() == "d\ne\nf\n"
    out = devkit / "VOC2012" / "SegmentationClassAug"
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    np.testing.assert_array_equal(read_png(out / "a.png"), [[0, 1], [255, 20]])
    np.testing.assert_array_equal(read_png(out / "b.png"), [[15, 15], [0, 255]])
    np.testing.assert_array_equal(read_png(out / "c.png"), [[3, 3], [3, 0]])
    np.testing.assert_array_equal(read_png(out / "d.png"), [[0, 7, 7], [0, 0, 12]])
    np.testing.assert_array_equal(read_png(out / "e.png"), [[20]])
    np.testing.assert_array_equal(read_png(out / "f.png"), [[2, 0]])

    again = convert_voc_aug(devkit, ds)  # the dataset/ folder itself is accepted too
    assert again["skipped"] == 6 and again["from_sbd"] == again["from_voc"] == 0


def test_voc_aug_rgb_voc_label_and_bad_inputs(tmp_path):
    devkit, sbd = tmp_path / "VOCdevkit", tmp_path / "benchmark_RELEASE"
    sets = devkit / "VOC2012" / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\n")
    (sets / "val.txt").write_text("")
    voc = devkit / "VOC2012" / "SegmentationClass"
    voc.mkdir(parents=True)
    # RGB-saved label: black (0), dark red (1), VOC boundary colour (224, 224, 192) = 255
    Image.fromarray(np.array([[[0, 0, 0], [128, 0, 0], [224, 224, 192]]], dtype=np.uint8)).save(voc / "a.png")
    ds = sbd / "dataset"
    ds.mkdir(parents=True)
    (ds / "train.txt").write_text("g\n")
    (ds / "val.txt").write_text("")
    (ds / "cls").mkdir()
    savemat(str(ds / "cls" / "g.mat"), {"GTinst": {"Segmentation": np.zeros((2, 2))}})
    with pytest.raises(ConversionError, match=r"g\.mat.*no 'GTcls'"):
        convert_voc_aug(devkit, sbd)

    write_mat(ds / "cls" / "g.mat", [[0, 21]])
    with pytest.raises(ConversionError, match=r"g\.mat.*\[21\]"):
        convert_voc_aug(devkit, sbd)

    write_mat(ds / "cls" / "g.mat", [[0, 5]])
    assert convert_voc_aug(devkit, sbd)["trainaug"] == 2
    np.testing.assert_array_equal(read_png(devkit / "VOC2012" / "SegmentationClassAug" / "a.png"), [[0, 1, 255]])

    (ds / "val.txt").write_text("h\n")
    with pytest.raises(ConversionError, match=r"no \.mat file.*'h'"):
        convert_voc_aug(devkit, sbd)


# --------------------------------------------------------------------------------------------------
# COCO-Stuff / COCO-Object
# --------------------------------------------------------------------------------------------------

# raw stuffthingmaps value -> train id, from mmseg's clsID_to_trID as printed there
HAND_STUFF = {
    0: 0, 10: 10, 11: 255, 12: 11, 24: 23, 25: 255, 26: 24, 27: 25, 28: 255, 29: 255, 30: 26, 43: 39,
    44: 255, 45: 40, 64: 59, 65: 255, 66: 60, 67: 255, 68: 255, 69: 61, 70: 255, 71: 62, 81: 72, 82: 255,
    83: 73, 89: 79, 90: 255, 91: 80, 92: 81, 180: 169, 181: 170, 182: 255, 200: 255, 255: 255,
}  # fmt: skip


def test_coco_stuff_mapping():
    assert len(USED_RAW_IDS) == 171
    assert all(a < b for a, b in zip(USED_RAW_IDS, USED_RAW_IDS[1:]))  # monotone
    for raw, train in HAND_STUFF.items():
        assert STUFF_LUT[raw] == train, raw
    used = STUFF_LUT[:182]
    assert sorted(used[used != 255].tolist()) == list(range(171))
    names = [s[0] for s in read_class_names("coco_stuff171")]
    assert len(names) == 171 and names[79] == "toothbrush" and names[80] == "banner"


def test_coco_stuff_and_object_converters(tmp_path):
    src = tmp_path / "stuffthingmaps_trainval2017"
    root = tmp_path / "coco_stuff164k"
    raw_val = [[0, 10, 11, 12, 89, 90], [91, 181, 255, 182, 25, 24]]
    write_png(src / "val2017" / "000000000139.png", raw_val)
    write_png(src / "val2017" / "000000000285.png", [[1, 2], [3, 4]])
    write_png(src / "train2017" / "000000000009.png", [[79, 80], [81, 92]])

    with pytest.warns(ConversionWarning, match=r"000000000139\.png: \[11, 25, 90, 182\]"):
        summary = convert_coco_stuff(root, src, nproc=2)
    assert summary == {"train": 1, "val": 2, "written": 3, "skipped": 0, "files_with_unknown_ids": 1}
    ann = root / "annotations"
    val_out = ann / "val2017" / "000000000139_labelTrainIds.png"
    np.testing.assert_array_equal(read_png(val_out), [[0, 10, 255, 11, 79, 255], [80, 170, 255, 255, 255, 23]])
    np.testing.assert_array_equal(read_png(ann / "val2017" / "000000000285_labelTrainIds.png"), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(read_png(ann / "train2017" / "000000000009_labelTrainIds.png"), [[70, 71], [72, 81]])

    summary = convert_coco_object(root)
    assert summary == {"train": 1, "val": 2, "written": 3, "skipped": 0, "unlabeled": "background"}
    obj = ann / "val2017" / "000000000139_instanceTrainIds.png"
    # things 0..79 -> 1..80, stuff -> 0, unlabeled 255 -> 0 (GroupViT/SCLIP's converter)
    np.testing.assert_array_equal(read_png(obj), [[1, 11, 0, 12, 80, 0], [0, 0, 0, 0, 0, 24]])
    train_obj = ann / "train2017" / "000000000009_instanceTrainIds.png"
    np.testing.assert_array_equal(read_png(train_obj), [[71, 72], [73, 0]])
    assert convert_coco_object(root)["skipped"] == 3
    convert_coco_object(root, splits=("val",), overwrite=True, unlabeled="ignore")
    np.testing.assert_array_equal(read_png(obj), [[1, 11, 255, 12, 80, 255], [0, 0, 255, 255, 255, 24]])

    # raw maps unpacked into ROOT/annotations (mmseg's layout): converted files there are not inputs
    write_png(ann / "val2017" / "000000000632.png", [[255, 0]])
    summary = convert_coco_stuff(root, splits=("val",))
    assert summary == {"val": 1, "written": 1, "skipped": 0, "files_with_unknown_ids": 0}
    np.testing.assert_array_equal(read_png(ann / "val2017" / "000000000632_labelTrainIds.png"), [[255, 0]])


def test_coco_bad_inputs(tmp_path):
    root = tmp_path / "coco_stuff164k"
    with pytest.raises(ConversionError, match=r"val2017.*not found"):
        convert_coco_stuff(root, splits=("val",))
    (root / "annotations" / "val2017").mkdir(parents=True)
    with pytest.raises(ConversionError, match="no raw stuffthingmaps"):
        convert_coco_stuff(root, splits=("val",))
    with pytest.raises(ConversionError, match="run `ovseg data convert coco_stuff"):
        convert_coco_object(root, splits=("val",))
    write_png(root / "annotations" / "val2017" / "x_labelTrainIds.png", [[0, 200]])
    with pytest.raises(ConversionError, match=r"x_labelTrainIds\.png.*\[200\]"):
        convert_coco_object(root, splits=("val",))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "annotations" / "val2017" / "rgb.png")
    with pytest.raises(ConversionError, match=r"rgb\.png.*mode RGB"):
        convert_coco_stuff(root, splits=("val",))


# --------------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------------


def test_cityscapes_converter(tmp_path):
    root = tmp_path / "cityscapes"
    city = root / "gtFine" / "val" / "frankfurt"
    ids = [
        [0, 1, 6, 7, 8, 9, 11, 12],
        [13, 17, 19, 20, 21, 22, 23, 24],
        [25, 26, 27, 28, 29, 30, 31, 32],
        [33, 18, 15, 34, 255, 4, 3, 2],
    ]
    write_png(city / "frankfurt_000000_000294_gtFine_labelIds.png", ids)
    write_png(root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", [[7, 26]])
    with pytest.warns(ConversionWarning, match=r"\[34, 255\]"):
        summary = convert_cityscapes(root)
    assert summary == {"train": 1, "val": 1, "written": 2, "skipped": 0, "files_with_unknown_ids": 1}
    expected = [
        [255, 255, 255, 0, 1, 255, 2, 3],
        [4, 5, 6, 7, 8, 9, 10, 11],
        [12, 13, 14, 15, 255, 255, 16, 17],
        [18, 255, 255, 255, 255, 255, 255, 255],
    ]
    np.testing.assert_array_equal(read_png(city / "frankfurt_000000_000294_gtFine_labelTrainIds.png"), expected)
    out = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"
    np.testing.assert_array_equal(read_png(out), [[0, 13]])
    assert convert_cityscapes(tmp_path, splits=("train",))["skipped"] == 1  # data root holding cityscapes/ works

    (city / "frankfurt_000000_000576_gtFine_polygons.json").write_text("{}")
    with pytest.raises(ConversionError, match=r"frankfurt_000000_000576_gtFine_polygons\.json.*cityscapesscripts"):
        convert_cityscapes(root, splits=("val",))
    with pytest.raises(ConversionError, match="gtFine/test.*not found"):
        convert_cityscapes(root, splits=("test",))


# --------------------------------------------------------------------------------------------------
# CLI registration
# --------------------------------------------------------------------------------------------------


def test_register_all_and_cli(tmp_path, capsys):
    assert list(CONVERTERS) == ["pascal_context", "voc_aug", "coco_stuff", "coco_object", "cityscapes", "ade847",
                                "pc459"]
    parser = argparse.ArgumentParser(prog="ovseg data convert")
    register_all(parser.add_subparsers(dest="converter", required=True))
    for name in CONVERTERS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        assert "--nproc" in capsys.readouterr().out

    root = tmp_path / "cityscapes"
    write_png(root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png", [[7]])
    args = parser.parse_args(["cityscapes", str(root), "--splits", "val", "--nproc", "2", "--overwrite"])
    assert args.nproc == 2 and args.overwrite and args.splits == ["val"]
    summary = args.func(args)
    assert summary["written"] == 1
    assert "cityscapes: val=1, written=1" in capsys.readouterr().out
