"""The one file-list dataset: reads any :class:`~ovseg.data.specs.DatasetSpec` from disk.

Samples are dicts: ``image`` (uint8 ``[3,H,W]``; converted to float in [0,1] after the device
transfer, see :meth:`OVSegDataModule.on_after_batch_transfer`), ``label`` (int64 ``[H,W]``, the spec's
``ignore_index`` = ignore: 255, or 65535 where 255 is a class; already mapped to the dataset's convention) and
``meta``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ovseg.data.files import DataError, exif_orientation, read_image, read_label_png
from ovseg.data.specs import IGNORE_INDEX, DatasetSpec, get_spec

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def values_outside_classes(label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[int]:
    """Up to 10 sorted label values that are neither a class id in ``[0, num_classes)`` nor ``ignore_index``."""
    bad = (label >= num_classes) & (label != ignore_index) | (label < 0)
    return np.unique(label[bad]).tolist()[:10] if bad.any() else []


def split_ids(spec: DatasetSpec, root: str | Path, split: str) -> list[str]:
    """File ids of a split: the split file's lines, or every image under the image folder."""
    img_dir = spec.path(root, spec.img_dir, split)
    if not img_dir.is_dir():
        raise DataError(
            f"dataset {spec.name!r} ({split}): image folder {img_dir} not found under data root {root}; "
            f"expected the mmsegmentation layout {spec.img_dir} / {spec.ann_dir} (see `ovseg data verify`)"
        )
    if spec.split_file is not None:
        split_file = spec.path(root, spec.split_file, split)
        if not split_file.is_file():
            raise DataError(f"dataset {spec.name!r}: split file {split_file} not found")
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"dataset {spec.name!r}: split file {split_file} is empty")
        repeated = [i for i, n in Counter(ids).items() if n > 1]
        if repeated:  # an image listed twice would be scored twice
            raise DataError(f"dataset {spec.name!r}: split file {split_file} lists {len(repeated)} id(s) more than "
                            f"once, e.g. {repeated[:5]}")
        return ids
    listed, suffix = (spec.path(root, spec.ann_dir, split), spec.seg_suffix) if spec.ids_from_labels else \
        (img_dir, spec.img_suffix)
    if not listed.is_dir():
        raise DataError(f"dataset {spec.name!r} ({split}): label folder {listed} not found under data root {root}")
    ids = sorted(str(p.relative_to(listed))[: -len(suffix)] for p in listed.rglob(f"*{suffix}") if p.is_file())
    if not ids:
        raise DataError(f"dataset {spec.name!r}: no *{suffix} {'labels' if spec.ids_from_labels else 'images'} "
                        f"under {listed}")
    return ids


def split_images(spec: DatasetSpec, root: str | Path, split: str) -> list[tuple[str, Path]]:
    """``(file_id, image_path)`` of a split, checked to exist (labels not needed)."""
    img_dir = spec.path(root, spec.img_dir, split)
    images = [(file_id, img_dir / f"{file_id}{spec.img_suffix}") for file_id in split_ids(spec, root, split)]
    for _, image in images:
        if not image.is_file():
            raise DataError(f"dataset {spec.name!r}: image {image} listed in the split is missing")
    return images


def list_samples(spec: DatasetSpec, root: str | Path, split: str) -> list[tuple[str, Path, Path]]:
    """``(file_id, image_path, label_path)`` for every sample of a split, checked to exist."""
    ann_dir = spec.path(root, spec.ann_dir, split)
    images = split_images(spec, root, split)
    if not ann_dir.is_dir():
        raise DataError(f"dataset {spec.name!r} ({split}): label folder {ann_dir} not found under data root {root}")
    samples = []
    for file_id, image in images:
        label = ann_dir / f"{file_id}{spec.seg_suffix}"
        if not label.is_file():
            raise DataError(f"dataset {spec.name!r}: image {image} has no label (expected {label})")
        samples.append((file_id, image, label))
    return samples


def split_fingerprint(spec: DatasetSpec | str, root: str | Path, split: str = "val") -> str:
    """A cheap identity of a split's files: ids, paths relative to the root, sizes and modification times of every
    image and label (no contents read). An added, removed, replaced or touched file changes it; the same files
    moved to another root (with their times, ``cp -a`` / ``rsync -a``) do not."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    root = Path(root)
    digest = hashlib.sha256(f"{spec.name}|{split}".encode())
    for file_id, image_path, label_path in list_samples(spec, root, split):
        for path in (image_path, label_path):
            stat = Path(path).stat()
            digest.update(f"|{file_id}|{Path(path).relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class SegFileDataset(Dataset):
    """Image/label pairs of one dataset split, in its on-disk layout and label convention."""

    def __init__(self, spec: DatasetSpec | str, root: str | Path, split: str = "val", limit: int | None = None):
        self.spec = get_spec(spec) if isinstance(spec, str) else spec
        self.root = Path(root)
        self.split = split
        self.samples = list_samples(self.spec, self.root, split)
        if limit is not None:
            self.samples = self.samples[:limit]
        self.num_classes = self.spec.num_classes

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def class_names(self) -> list[list[str]]:
        return self.spec.class_names

    @property
    def background_index(self) -> int | None:
        return self.spec.background_index

    @property
    def ignore_index(self) -> int:
        return self.spec.ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, index: int) -> np.ndarray:
        """The mapped label of sample ``index``, validated against the class range."""
        _, _, label_path = self.samples[index]
        label = self.spec.map_label(read_label_png(label_path))
        values = values_outside_classes(label, self.num_classes, self.ignore_index)
        if values:
            raise DataError(
                f"{label_path}: label values {values} outside the {self.num_classes} classes of {self.spec.name!r} "
                f"(after its label mapping; {self.ignore_index} = ignore)"
            )
        return label

    def __getitem__(self, index: int) -> dict:
        file_id, image_path, label_path = self.samples[index]
        image = read_image(image_path)
        label = self.load_label(index)
        if label.shape != image.shape[:2]:
            raise DataError(
                f"{label_path}: label size {label.shape[1]}x{label.shape[0]} differs from its image "
                f"{image_path} ({image.shape[1]}x{image.shape[0]})"
            )
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label),
            "meta": {"dataset": self.spec.name, "id": file_id, "image_path": str(image_path), "index": index,
                     # applied (or not) by the evaluator, as the protocol's reference reader does
                     "exif_orientation": exif_orientation(image_path)},
        }


class ImageFolderDataset(Dataset):
    """Unlabelled images (a folder, searched recursively, or a single file) for ``ovseg predict``, read as a photo
    viewer shows them (EXIF orientation applied). Left out, with a warning saying how many: files with other
    suffixes, macOS metadata files (``._photo.jpg``) and anything under ``exclude`` (``ovseg predict``'s own output
    folder, when it is inside the image folder)."""

    def __init__(self, images: str | Path, exclude: str | Path | None = None):
        images = Path(images)
        if images.is_file():
            self.paths = [images]
        elif images.is_dir():
            files = [p for p in images.rglob("*") if p.is_file()]
            outputs = Path(exclude).resolve() if exclude is not None else None
            left_out = {"not an image": [], "macOS metadata": [], "ovseg predict output": []}
            self.paths = []
            for path in sorted(files):
                if outputs is not None and path.resolve().is_relative_to(outputs):
                    left_out["ovseg predict output"].append(path)
                elif path.name.startswith("._"):
                    left_out["macOS metadata"].append(path)
                elif path.suffix.lower() not in IMAGE_SUFFIXES:
                    left_out["not an image"].append(path)
                else:
                    self.paths.append(path)
            for why, paths in left_out.items():
                if paths:
                    log.warning("%s: %d file(s) left out (%s), e.g. %s", images, len(paths), why, paths[0])
        else:
            raise DataError(f"{images}: no such image file or folder")
        if not self.paths:
            raise DataError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        self.root = images if images.is_dir() else images.parent
        # outputs are named after the id (``<id>_label.png``): the path without its suffix, unless another image
        # shares that stem (``x.jpg`` and ``x.png``), then the path with it, so no prediction overwrites another
        stems = [str(p.relative_to(self.root).with_suffix("")) for p in self.paths]
        shared = {stem for stem, n in Counter(stems).items() if n > 1}
        self.ids = [str(p.relative_to(self.root)) if stem in shared else stem for p, stem in zip(self.paths, stems)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        image = read_image(path, exif_orientation=True)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "meta": {"dataset": "predict", "id": self.ids[index],
                     "image_path": str(path), "index": index},
        }


def collate_samples(samples: list[dict]) -> dict:
    """Evaluation images differ in size: keep them as lists (the evaluator handles one at a time)."""
    batch = {key: [s[key] for s in samples] for key in samples[0]}
    return batch
