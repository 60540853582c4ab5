"""MaskCLIP+'s training source: single augmented crops of a benchmark split's images, never its labels.

The augmentation is the train pipeline of MaskCLIP's released configs (``configs/_base_/datasets/*.py`` and the
``configs/maskclip_plus/anno_free/*.py`` overrides; mmseg 0.x ``mmseg/datasets/pipelines/transforms.py``), applied
to the image alone: ``Resize(img_scale, ratio_range=(0.5, 2.0))`` (keep ratio, cv2 bilinear on uint8),
``RandomCrop(crop_size)``, ``RandomFlip(0.5)``, ``PhotoMetricDistortion()``, ``Pad(crop_size)``. Every random draw
comes from numpy's global stream in the reference's order, which :class:`ovseg.data.samplers.EpochSeededSamples`
seeds per sample (the same crops in any process, worker or resumed run).

The reference reads the ground truth in two places. ``RandomCrop(cat_max_ratio=0.75)`` re-draws a crop up to 10
times while one class covers more than 75 % of its label crop, but the annotation-free configs suppress every class
to -1 (``LoadAnnotations(suppress_labels=all)``), so the check never passes and the crop is the last of 11 uniform
draws: the same distribution as the one draw here. And ``maskclip_plus_head.py`` assigns pseudo labels only where
``gt_semantic_seg < 0``, so pixels whose label is 255 (VOC / Context background after ``reduce_zero_label``,
boundaries, COCO-Stuff's unlabelled) do not train there. Here nothing is read from the labels: every pixel of the
crop trains, only the padding is ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ovseg.data.sources import ImageFolder, SpecImages, TrainSource
from ovseg.utils.geometry import keep_ratio_size

__all__ = ["MMSegCrop", "PseudoLabelCrops", "photometric_distortion"]


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion.convert``: float32 affine, clipped, truncated to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, brightness_delta: int = 32, contrast_range: tuple[float, float] = (
        0.5, 1.5), saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg 0.x ``PhotoMetricDistortion.__call__`` on an RGB uint8 image (the reference's BGR image through
    ``bgr2hsv`` is the same HSV as RGB through ``RGB2HSV``), drawing from ``np.random`` in the reference's order:
    brightness, contrast mode, [contrast], saturation, hue, [contrast]; each applied with probability 1/2."""
    import cv2

    rand = np.random
    if rand.randint(2):
        image = _convert(image, beta=rand.uniform(-brightness_delta, brightness_delta))
    mode = rand.randint(2)

    def contrast(img: np.ndarray) -> np.ndarray:
        return _convert(img, alpha=rand.uniform(*contrast_range)) if rand.randint(2) else img

    if mode == 1:
        image = contrast(image)
    if rand.randint(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rand.uniform(*saturation_range))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rand.randint(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rand.randint(-hue_delta, hue_delta)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0:
        image = contrast(image)
    return image


class MMSegCrop:
    """The train pipeline of MaskCLIP+'s configs on an image: a sample ``{"image": uint8 HxWx3, ...}`` ->
    ``image`` uint8 ``[3, S, S]`` (padding zero, bottom/right), ``valid`` bool ``[S, S]`` (False on the padding)."""

    def __init__(self, crop_size: int = 512, img_scale: tuple[int, int] = (2048, 512),
                 ratio_range: tuple[float, float] = (0.5, 2.0), flip: float = 0.5, photometric: bool = True):
        """The pipeline.

        Args:
            crop_size: square crop side (VOC / COCO-Stuff 512, Pascal Context 480).
            img_scale: mmseg ``Resize.img_scale`` (long, short) before the ratio (VOC / COCO-Stuff (2048, 512),
                Pascal Context (520, 520)).
            ratio_range: the random ratio multiplying ``img_scale``.
            flip: probability of a horizontal flip.
            photometric: apply ``PhotoMetricDistortion`` (mmseg defaults).
        """
        self.crop_size, self.img_scale, self.ratio_range = crop_size, tuple(img_scale), tuple(ratio_range)
        self.flip, self.photometric = flip, photometric

    def resize(self, image: np.ndarray) -> np.ndarray:
        """``Resize.random_sample_ratio`` + ``mmcv.imrescale`` (cv2 bilinear on uint8)."""
        import cv2

        low, high = self.ratio_range
        ratio = np.random.random_sample() * (high - low) + low
        scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        height, width = keep_ratio_size(*image.shape[:2], short_side=min(scale), long_side_max=max(scale))
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = self.resize(np.ascontiguousarray(sample["image"]))
        size = self.crop_size
        # RandomCrop.get_crop_bbox (cat_max_ratio left out: it reads the labels)
        top = np.random.randint(0, max(image.shape[0] - size, 0) + 1)
        left = np.random.randint(0, max(image.shape[1] - size, 0) + 1)
        image = image[top:top + size, left:left + size]
        if np.random.rand() < self.flip:
            image = image[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image))
        padded = np.zeros((size, size, 3), np.uint8)
        padded[:image.shape[0], :image.shape[1]] = image
        valid = np.zeros((size, size), bool)
        valid[:image.shape[0], :image.shape[1]] = True
        return {**{k: v for k, v in sample.items() if k != "image"},
                "image": torch.from_numpy(padded.transpose(2, 0, 1).copy()), "valid": torch.from_numpy(valid)}


class PseudoLabelCrops(TrainSource):
    """MaskCLIP+'s training source: the images (never the labels) of a benchmark split, or of a folder, as one
    augmented crop each (:class:`MMSegCrop`).

    Batches: ``image`` uint8 ``[B, 3, S, S]`` (the DataModule makes floats in [0, 1]), ``valid`` bool ``[B, S, S]``,
    ``meta`` a list of B dicts.
    """

    def __init__(self, dataset: str = "voc_aug", split: str = "trainaug", folder: str | None = None,
                 limit: int | None = None, **crop: Any):
        """A crop training source.

        Args:
            dataset: the benchmark whose images are used (labels never read); ignored when ``folder`` is given.
            split: its split.
            folder: any image folder (relative to the data root or absolute) instead.
            limit: first N images only.
            crop: the :class:`MMSegCrop` settings (``crop_size``, ``img_scale``, ``ratio_range``, ``flip``,
                ``photometric``).
        """
        self.crop = MMSegCrop(**crop)
        self.source: TrainSource = (ImageFolder(folder, limit=limit, transform=self.crop) if folder is not None
                                    else SpecImages(dataset, split, limit=limit, transform=self.crop))

    def build(self, root: str | Path) -> Dataset:
        return self.source.build(root)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([s["image"] for s in samples]),
                "valid": torch.stack([s["valid"] for s in samples]),
                "meta": [s["meta"] for s in samples]}
