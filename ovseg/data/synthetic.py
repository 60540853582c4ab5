"""Tiny datasets in the exact on-disk layouts and raw label conventions of the benchmarks.

Used by the tests, CI and the demo: every code path that reads a real dataset reads these the same
way (split files, suffixes, palette PNGs, city subfolders, raw ids before ``reduce_zero_label``).
Scenes are coloured shapes on a background; each class has its own colour so a model can in
principle tell them apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ovseg.data.files import DataError
from ovseg.data.label_maps import coco_object_lut
from ovseg.data.specs import IGNORE_INDEX, DatasetSpec, get_spec, voc_palette
from ovseg.utils.io import atomic_open, atomic_save_png, atomic_save_tiff, atomic_write_text

CITIES = ("frankfurt", "lindau", "munster")


def raw_class_count(spec: DatasetSpec) -> int:
    """Number of distinct raw ids in the label PNGs (ADE's 0 = "other" and voc20's background included)."""
    return spec.num_classes + (1 if spec.reduce_zero_label else 0)


def synth_label(rng: np.random.Generator, height: int, width: int, num_raw: int, boundary: bool,
                max_shapes: int = 4, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A raw label map: a random 'stuff' background id plus rectangles and ellipses of other ids,
    optionally with ``ignore_index`` boundary bands (VOC style); uint16 where ``ignore_index`` needs it."""
    # id 0 is the background of VOC/Context (and ADE's "other"): make it the most common backdrop
    backdrop = 0 if rng.random() < 0.5 else rng.integers(0, num_raw)
    label = np.full((height, width), backdrop, dtype=np.uint8 if ignore_index <= 255 else np.uint16)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cls = int(rng.integers(0, num_raw))
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        ry, rx = rng.integers(height // 8 + 1, height // 2 + 2), rng.integers(width // 8 + 1, width // 2 + 2)
        if rng.random() < 0.5:
            shape = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        else:
            shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if boundary:
            inner = np.zeros_like(shape)
            inner[1:-1, 1:-1] = (
                shape[1:-1, 1:-1] & shape[:-2, 1:-1] & shape[2:, 1:-1] & shape[1:-1, :-2] & shape[1:-1, 2:]
            )
            label[shape & ~inner] = ignore_index
            label[inner] = cls
        else:
            label[shape] = cls
    return label


def synth_image(rng: np.random.Generator, label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    image = colours[label].astype(np.float32)
    image += rng.normal(0, 12, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


#: the year part of synthetic VOC-style ids, per split
SPLIT_YEARS = {"val": 2008, "train": 2009, "trainaug": 2010, "aug": 2011}


def _file_ids(spec: DatasetSpec, split: str, n: int) -> list[str]:
    if spec.name == "cityscapes":
        return [f"{CITIES[i % len(CITIES)]}/{CITIES[i % len(CITIES)]}_{i:06d}_000019" for i in range(n)]
    if spec.name.startswith("ade"):
        return [f"ADE_{'val' if split == 'val' else 'train'}_{i + 1:08d}" for i in range(n)]
    if spec.name.startswith(("coco", )):
        return [f"{i + 1:012d}" for i in range(n)]
    # VOC-family splits share one JPEGImages folder: each split gets its own year so none overwrites another's images
    year = SPLIT_YEARS.get(split, 2012)
    # PC-459 shares JPEGImages with context59/60 but lists its own labels: ids of its own, so neither overwrites
    first = 100001 if spec.ids_from_labels else 1
    return [f"{year}_{first + i:06d}" for i in range(n)]


def write_synthetic(
    name: str,
    root: str | Path,
    split: str = "val",
    num_images: int = 4,
    size: tuple[int, int] = (48, 96),
    seed: int = 0,
) -> list[str]:
    """Write ``num_images`` image/label pairs of dataset ``name`` under ``root``; returns the file ids.

    Image sides are drawn from ``size`` (min, max), so images differ in shape and aspect.
    """
    if name == "coco_object":
        # COCO-Object shares COCO-Stuff's images and is derived from its labels, as the converter does
        return _derive_coco_object(root, split, num_images, size, seed)
    spec = get_spec(name)
    rng = np.random.default_rng(seed)
    num_raw = raw_class_count(spec)
    palette = voc_palette(256)
    colours = rng.integers(0, 256, size=(max(256, spec.ignore_index + 1), 3))
    colours[spec.ignore_index] = (224, 224, 192)
    voc_like = spec.seg_suffix == ".png" and spec.img_suffix == ".jpg" and spec.split_file is not None
    wide = spec.ignore_index > 255  # 16-bit TIFF labels (ADE-847, PC-459), with ignore bands to exercise 65535
    ids = _file_ids(spec, split, num_images)
    listed, suffix = (spec.path(root, spec.ann_dir, split), spec.seg_suffix) if spec.ids_from_labels else \
        (spec.path(root, spec.img_dir, split), spec.img_suffix)
    if spec.split_file is None and listed.is_dir():
        # without a split file every file in the folder is evaluated: earlier, other files would be scored too
        wanted = {f"{i}{suffix}" for i in ids}
        others = sorted(str(p.relative_to(listed)) for p in listed.rglob(f"*{suffix}")
                        if str(p.relative_to(listed)) not in wanted)
        if others:
            raise DataError(f"{listed} already holds {len(others)} other file(s) (e.g. {others[0]}), which "
                            f"{name!r} ({split}) would then also score: write into an empty root")
    for file_id in ids:
        height, width = (int(v) for v in rng.integers(size[0], size[1] + 1, size=2))
        label = synth_label(rng, height, width, num_raw, boundary=voc_like or wide or spec.name == "cityscapes",
                            ignore_index=spec.ignore_index)
        image = synth_image(rng, label, colours)
        image_path = spec.path(root, spec.img_dir, split) / f"{file_id}{spec.img_suffix}"
        with atomic_open(image_path, "wb") as f:
            Image.fromarray(image).save(f, format="PNG" if spec.img_suffix.endswith(".png") else "JPEG", quality=95)
        label_path = spec.path(root, spec.ann_dir, split) / f"{file_id}{spec.seg_suffix}"
        if spec.seg_suffix == ".tif":
            atomic_save_tiff(label_path, label.astype(np.uint16))
        else:
            atomic_save_png(label_path, label, palette=palette if voc_like else None)
    if spec.split_file is not None:
        atomic_write_text(spec.path(root, spec.split_file, split), "\n".join(ids) + "\n")
    return ids


def _derive_coco_object(root: str | Path, split: str, num_images: int, size: tuple[int, int], seed: int) -> list[str]:
    stuff, objects = get_spec("coco_stuff171"), get_spec("coco_object")
    ids = write_synthetic("coco_stuff171", root, split, num_images, size, seed)
    lut = coco_object_lut()
    for file_id in ids:
        stuff_label = np.asarray(Image.open(stuff.path(root, stuff.ann_dir, split) / f"{file_id}{stuff.seg_suffix}"))
        atomic_save_png(objects.path(root, objects.ann_dir, split) / f"{file_id}{objects.seg_suffix}", lut[stuff_label])
    return ids
