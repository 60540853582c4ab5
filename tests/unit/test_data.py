"""Dataset layouts, label conventions and clear errors on bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.data.classnames import parse_class_list, read_class_names
from ovseg.data.samplers import UnrepeatedShardSampler
from ovseg.data.seg_dataset import DataError, SegFileDataset
from ovseg.data.specs import SPECS, get_spec
from ovseg.data.synthetic import write_synthetic
from ovseg.eval.metrics import ConfusionMatrix


def raw_labels(ds):
    return [np.asarray(Image.open(path)) for _, _, path in ds.samples]


# independent statement of each convention on the raw PNG values: which pixels are scored
COUNTED = {
    "voc21": lambda raw: raw != 255,
    "voc20": lambda raw: (raw != 0) & (raw != 255),
    "context60": lambda raw: raw != 255,
    "context59": lambda raw: (raw != 0) & (raw != 255),
    "ade150": lambda raw: (raw != 0) & (raw != 255),
    "cityscapes": lambda raw: raw != 255,
    "coco_stuff171": lambda raw: raw != 255,
    "coco_object": lambda raw: raw != 255,
}


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_confusion_total_counts_non_ignored_pixels_of_each_convention(tmp_path, name):
    write_synthetic(name, tmp_path, num_images=3, seed=3)
    ds = SegFileDataset(name, tmp_path)
    expected = sum(int(COUNTED[name](raw).sum()) for raw in raw_labels(ds))
    metric = ConfusionMatrix(ds.num_classes)
    for i in range(len(ds)):
        label = ds[i]["label"]
        metric.update(torch.zeros_like(label), label)
    assert int(metric.compute().sum()) == expected > 0


def test_reduce_zero_label_shifts_ids_and_ignores_background(tmp_path):
    spec = get_spec("voc20")
    raw = np.array([[0, 1, 20, 255]], dtype=np.uint8)
    assert spec.map_label(raw).tolist() == [[255, 0, 19, 255]]
    assert get_spec("voc21").map_label(raw).tolist() == [[0, 1, 20, 255]]


def test_voc20_and_voc21_read_the_same_files(tmp_path):
    write_synthetic("voc21", tmp_path, num_images=2)
    a, b = SegFileDataset("voc21", tmp_path), SegFileDataset("voc20", tmp_path)
    assert [s[1] for s in a.samples] == [s[1] for s in b.samples]
    la, lb = a[0]["label"], b[0]["label"]
    fg = (la != 0) & (la != 255)
    assert torch.equal(lb[fg], la[fg] - 1) and bool((lb[la == 0] == 255).all())


def test_cityscapes_layout_has_city_subfolders(tmp_path):
    write_synthetic("cityscapes", tmp_path, num_images=3)
    ds = SegFileDataset("cityscapes", tmp_path)
    assert len(ds) == 3
    assert all("/" in file_id for file_id, _, _ in ds.samples)
    assert ds[0]["label"].shape == ds[0]["image"].shape[1:]


def test_sample_dict_format(tmp_path):
    write_synthetic("voc21", tmp_path, num_images=1)
    sample = SegFileDataset("voc21", tmp_path)[0]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape[0] == 3
    assert sample["label"].dtype == torch.int64
    assert sample["meta"]["dataset"] == "voc21"


def test_class_name_files_match_dataset_sizes():
    expected = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_stuff171": 171,
                "coco_object": 81, "ade150": 150, "cityscapes": 19}
    for name, n in expected.items():
        assert get_spec(name).num_classes == n
        assert len(read_class_names(f"sclip/{name}")) == n
    voc = read_class_names("sclip/voc21")
    assert "sky" in voc[0] and voc[15][0] == "person" and len(voc[15]) > 1


def test_inline_class_list_with_synonyms():
    assert parse_class_list("cat, dog;puppy ,sky") == [["cat"], ["dog", "puppy"], ["sky"]]


@pytest.mark.parametrize("n,world", [(7, 2), (1, 2), (10, 3), (0, 2)])
def test_unrepeated_shards_partition_the_dataset(n, world):
    shards = [list(UnrepeatedShardSampler(n, r, world)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n)) and len(flat) == n


# -- bad input: the message names the file and the problem ----------------------------------------
def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError, match=r"voc21.*image folder .*JPEGImages not found"):
        SegFileDataset("voc21", tmp_path)


def test_missing_split_file(tmp_path):
    write_synthetic("voc21", tmp_path, num_images=1)
    split = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    split.unlink()
    with pytest.raises(DataError, match=r"split file .*val\.txt not found"):
        SegFileDataset("voc21", tmp_path)


def test_image_without_label(tmp_path):
    ids = write_synthetic("voc21", tmp_path, num_images=2)
    (tmp_path / f"VOCdevkit/VOC2012/SegmentationClass/{ids[1]}.png").unlink()
    with pytest.raises(DataError, match=rf"{ids[1]}\.jpg has no label"):
        SegFileDataset("voc21", tmp_path)


def test_label_size_differs_from_image(tmp_path):
    ids = write_synthetic("voc21", tmp_path, num_images=1)
    path = tmp_path / f"VOCdevkit/VOC2012/SegmentationClass/{ids[0]}.png"
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(path)
    with pytest.raises(DataError, match=rf"{ids[0]}\.png: label size 7x5 differs from its image"):
        SegFileDataset("voc21", tmp_path)[0]


def test_label_value_outside_class_range(tmp_path):
    write_synthetic("cityscapes", tmp_path, num_images=1)
    ds = SegFileDataset("cityscapes", tmp_path)
    path = ds.samples[0][2]
    label = np.asarray(Image.open(path)).copy()
    label[0, 0] = 19
    Image.fromarray(label).save(path)
    with pytest.raises(DataError, match=r"labelTrainIds\.png: label values \[19\] outside the 19 classes"):
        ds[0]


def test_corrupt_image(tmp_path):
    ids = write_synthetic("voc21", tmp_path, num_images=1)
    (tmp_path / f"VOCdevkit/VOC2012/JPEGImages/{ids[0]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"{ids[0]}\.jpg: cannot decode image"):
        SegFileDataset("voc21", tmp_path)[0]


def test_unknown_class_name_file():
    with pytest.raises(FileNotFoundError, match="class-name file 'nope.txt' not found"):
        read_class_names("nope.txt")


def test_unknown_protocol():
    from ovseg.eval.protocols import load_protocol

    with pytest.raises(ValueError, match=r"unknown protocol 'sclp'.*clearclip, cliptrase, itaclip, lposs, maskclip, "
                                         r"naclip, pixelclip, pixelclip_masks, proxyclip, scclip, sclip, toyworld, "
                                         r"trident"):
        load_protocol("sclp")


def test_every_spec_has_its_class_file():
    for spec in SPECS.values():
        assert spec.num_classes > 0
