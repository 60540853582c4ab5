"""Training sources: what ``OVSegDataModule(train=...)`` trains on.

A source builds a map-style dataset from the data root and says how its samples are batched. Each
training method needs different samples (PixelCLIP: two views + class-agnostic masks; CLIP-S4: two
views with their geometry), so the method-specific sample building lives in the source's transform,
and the DataModule only shards, shuffles and batches. In a config::

    data:
      init_args:
        train:
          class_path: ovseg.data.sources.SpecImages
          init_args: {dataset: voc_aug, split: trainaug}
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, default_collate

from ovseg.data.files import files_fingerprint
from ovseg.data.seg_dataset import DataError, ImageFolderDataset, read_image, split_images
from ovseg.data.specs import get_spec

Transform = Callable[[dict[str, Any]], dict[str, Any]]


class TrainSource:
    """Base class: ``build(root)`` -> dataset of sample dicts; ``collate`` batches them."""

    def build(self, root: str | Path) -> Dataset:
        raise NotImplementedError

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return default_collate(samples)


class _ImagePaths(Dataset):
    """Unlabelled images from a list of paths, each passed through an optional transform."""

    def __init__(self, name: str, paths: list[Path], transform: Transform | None = None):
        if not paths:
            raise DataError(f"training source {name!r}: no images")
        self.name, self.paths, self.transform = name, paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    @functools.cached_property
    def _fingerprint(self) -> str:  # once: every checkpoint records it
        return files_fingerprint(self.paths, Path(os.path.commonpath(self.paths)))

    def fingerprint(self) -> str:
        """:func:`~ovseg.data.files.files_fingerprint` of the images (as listed when the run started)."""
        return self._fingerprint

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        sample = {"image": read_image(path), "meta": {"dataset": self.name, "image_path": str(path), "index": index}}
        return self.transform(sample) if self.transform is not None else sample


class SpecImages(TrainSource):
    """The images (never the labels) of a benchmark split, e.g. VOC 2012 train+aug for CLIP-S4.

    Samples: ``image`` uint8 HxWx3 numpy array before the transform, ``meta``.
    """

    def __init__(self, dataset: str = "voc_aug", split: str = "trainaug", limit: int | None = None,
                 transform: Transform | None = None):
        """The images of a benchmark split.

        Args:
            dataset: a dataset name (``ovseg list datasets``).
            split: its split.
            limit: use the first N images only (None: all).
            transform: a callable each sample goes through (None: samples as read).
        """
        self.dataset, self.split, self.limit, self.transform = dataset, split, limit, transform

    def build(self, root: str | Path) -> Dataset:
        paths = [image for _, image in split_images(get_spec(self.dataset), root, self.split)]
        return _ImagePaths(f"{self.dataset}:{self.split}", paths[: self.limit], self.transform)


class ImageFolder(TrainSource):
    """Any folder of images (searched recursively), relative to the data root or absolute."""

    def __init__(self, folder: str, limit: int | None = None, transform: Transform | None = None):
        """The images of a folder.

        Args:
            folder: the folder, relative to the data root or absolute (searched recursively).
            limit: use the first N images only (None: all, in path order).
            transform: a callable each sample goes through (None: samples as read).
        """
        self.folder, self.limit, self.transform = folder, limit, transform

    def build(self, root: str | Path) -> Dataset:
        folder = Path(self.folder)
        if not folder.is_absolute() and not folder.exists():
            folder = Path(root) / folder
        return _ImagePaths(str(self.folder), ImageFolderDataset(folder).paths[: self.limit], self.transform)


def seed_worker(worker_id: int) -> None:
    """Distinct, reproducible numpy/random streams per loader worker (augmentations)."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
