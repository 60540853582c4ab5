"""Benchmark datasets as data: one table of on-disk layouts and label conventions.

Layouts and label conventions follow mmsegmentation 1.x (users already have these folders; the README's
section "Datasets" lists them). A dataset is a :class:`DatasetSpec`, never a subclass: the one
file-list dataset in :mod:`ovseg.data.seg_dataset` reads every spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ovseg.data.classnames import read_class_names

IGNORE_INDEX = 255
#: the ignore value of datasets with 255 classes or more, whose labels are 16-bit (CAT-Seg's ADE-847 TIFFs)
WIDE_IGNORE_INDEX = 65535


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files are under the data root and how its label PNGs are read.

    Paths are relative to the data root and may contain ``{split}``, replaced by
    ``split_names.get(split, split)`` (ADE calls ``val`` "validation").
    """

    name: str
    img_dir: str
    ann_dir: str
    img_suffix: str
    seg_suffix: str
    #: split file with one file id per line; ``None`` lists ``img_dir`` recursively instead (``ann_dir`` with
    #: ``ids_from_labels``).
    split_file: str | None = None
    #: without a split file, the split is every label file under ``ann_dir`` (detectron2 ``load_sem_seg``, how
    #: CAT-Seg lists PC-459, whose images share VOC2010's JPEGImages folder with every other split).
    ids_from_labels: bool = False
    #: mmseg ``reduce_zero_label``: 0 -> 255, then every id - 1 (254 -> 255 again).
    reduce_zero_label: bool = False
    #: index of the class that stands for "background" when it is predicted (None: no such class).
    background_index: int | None = None
    #: image count of each official split, checked by ``ovseg data verify``.
    expected_counts: dict[str, int] = field(default_factory=dict)
    split_names: dict[str, str] = field(default_factory=dict)
    #: name of the class-name file in ``ovseg/data/classnames`` (defaults to ``name``).
    classnames: str | None = None
    description: str = ""
    #: the label value that means "ignore" after :meth:`map_label`: 255 (mmseg), or :data:`WIDE_IGNORE_INDEX`
    #: where 255 is a class id (ADE-847, PC-459).
    ignore_index: int = IGNORE_INDEX
    #: raw label values that also mean "ignore" (mapped to ``ignore_index``).
    raw_ignore: tuple[int, ...] = ()

    def path(self, root: str | Path, template: str, split: str) -> Path:
        return Path(root) / template.format(split=self.split_names.get(split, split))

    @property
    def class_names(self) -> list[list[str]]:
        return read_class_names(self.classnames or self.name)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values -> training/eval ids (int64, ``ignore_index`` = ignore), mmseg semantics."""
        label = raw.astype(np.int64)
        if self.raw_ignore:
            label[np.isin(label, self.raw_ignore)] = self.ignore_index
        if self.reduce_zero_label:
            label[label == 0] = IGNORE_INDEX
            label = label - 1
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        return label


#: the Pascal VOC 2012 folders, shared by voc21/voc20, the SBD training set and the toy world
_VOC_LAYOUT = dict(
    img_dir="VOCdevkit/VOC2012/JPEGImages",
    ann_dir="VOCdevkit/VOC2012/SegmentationClass",
    split_file="VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt",
    img_suffix=".jpg",
    seg_suffix=".png",
)
_VOC = dict(**_VOC_LAYOUT, expected_counts={"val": 1449, "train": 1464})
_CONTEXT = dict(
    img_dir="VOCdevkit/VOC2010/JPEGImages",
    ann_dir="VOCdevkit/VOC2010/SegmentationClassContext",
    split_file="VOCdevkit/VOC2010/ImageSets/SegmentationContext/{split}.txt",
    img_suffix=".jpg",
    seg_suffix=".png",
    expected_counts={"val": 5104, "train": 4996},
)
_COCO = dict(
    img_dir="coco_stuff164k/images/{split}2017",
    ann_dir="coco_stuff164k/annotations/{split}2017",
    img_suffix=".jpg",
    expected_counts={"val": 5000, "train": 118287},
)

SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("voc21", **_VOC, background_index=0, description="Pascal VOC 2012, background predicted"),
        DatasetSpec("voc20", **_VOC, reduce_zero_label=True, description="Pascal VOC 2012, background ignored"),
        DatasetSpec(
            "voc_aug",
            **{**_VOC_LAYOUT, "ann_dir": "VOCdevkit/VOC2012/SegmentationClassAug"},
            background_index=0,
            classnames="voc21",
            expected_counts={"trainaug": 10582, "aug": 9118},
            description="Pascal VOC 2012 + SBD (SegmentationClassAug), the usual training set",
        ),
        DatasetSpec("context60", **_CONTEXT, background_index=0, description="Pascal Context, 59 + background"),
        DatasetSpec(
            "context59", **_CONTEXT, reduce_zero_label=True, description="Pascal Context, background ignored"
        ),
        DatasetSpec(
            "coco_stuff171", **_COCO, seg_suffix="_labelTrainIds.png", description="COCO-Stuff 164k, 171 classes"
        ),
        DatasetSpec(
            "coco_object",
            **_COCO,
            seg_suffix="_instanceTrainIds.png",
            background_index=0,
            description="COCO-Object: background + 80 things, from COCO-Stuff",
        ),
        DatasetSpec(
            "ade150",
            img_dir="ade/ADEChallengeData2016/images/{split}",
            ann_dir="ade/ADEChallengeData2016/annotations/{split}",
            img_suffix=".jpg",
            seg_suffix=".png",
            reduce_zero_label=True,
            split_names={"val": "validation", "train": "training"},
            expected_counts={"val": 2000, "train": 20210},
            description="ADE20K SceneParsing, 150 classes, 'other' (0) ignored",
        ),
        DatasetSpec(
            "ade847",
            # CAT-Seg datasets/prepare_ade20k_full.py (`ovseg data convert ade847`): validation images with the short
            # side shrunk to 512, labels as 16-bit TIFFs; register_ade20k_847.py: ignore_label=65535
            img_dir="ADE20K_2021_17_01/images_detectron2/{split}",
            ann_dir="ADE20K_2021_17_01/annotations_detectron2/{split}",
            img_suffix=".jpg",
            seg_suffix=".tif",
            split_names={"val": "validation", "train": "training"},
            expected_counts={"val": 2000},
            ignore_index=WIDE_IGNORE_INDEX,
            description="ADE20K full (2021_17_01), 847 classes as CAT-Seg, 16-bit labels, 65535 ignored",
        ),
        DatasetSpec(
            "pc459",
            # CAT-Seg datasets/prepare_pascal_context_459.py (`ovseg data convert pc459`): LabelMap - 1 of the
            # 459-class .mat files as uint16 TIFFs (a 0 in LabelMap wraps to 65535); register_pascal_context.py
            # lists every TIFF (load_sem_seg) and sets ignore_label=459 (LabelMap 460, no class of labels.txt).
            # A 65535 would make their SemSegEvaluator fail (it bincounts past its matrix), so the release they
            # scored holds none; here it is ignored, as ODISE's prepare_pascal_ctx_full_sem_seg.py does.
            img_dir="VOCdevkit/VOC2010/JPEGImages",
            ann_dir="VOCdevkit/VOC2010/annotations_detectron2/pc459_{split}",
            img_suffix=".jpg",
            seg_suffix=".tif",
            ids_from_labels=True,
            expected_counts={"val": 5104},
            ignore_index=WIDE_IGNORE_INDEX,
            raw_ignore=(459,),
            description="Pascal Context full, 459 classes as CAT-Seg (LabelMap - 1, 16-bit labels)",
        ),
        DatasetSpec(
            "cityscapes",
            img_dir="cityscapes/leftImg8bit/{split}",
            ann_dir="cityscapes/gtFine/{split}",
            img_suffix="_leftImg8bit.png",
            seg_suffix="_gtFine_labelTrainIds.png",
            expected_counts={"val": 500, "train": 2975},
            description="Cityscapes fine, 19 train ids",
        ),
        DatasetSpec(
            "toyworld",
            **_VOC_LAYOUT,
            expected_counts={"val": 300, "train": 4000},
            description="ovseg's procedural toy world (`ovseg toyworld generate`, own root), 18 classes, no background",
        ),
    ]
}

#: the benchmark datasets (``voc_aug`` is a training source only).
BENCHMARKS = ("voc21", "voc20", "context60", "context59", "coco_stuff171", "coco_object", "ade150", "cityscapes",
              "ade847", "pc459")


def get_spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(SPECS)}") from None


def voc_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map (bit-interleaved), used for every dataset's label PNGs and overlays."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette
