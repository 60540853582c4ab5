"""Two augmented views of one image with known geometry (CLIP-S4), and the geometry maths.

A view is a random resized crop of the source image (optionally flipped) resized to ``crop_size``,
followed by photometric jitter. Its geometry is five numbers ``(x0, y0, x1, y1, flip)``: the crop box
in *normalised source coordinates* (edges, ``[0, 1]``; albumentations' ``crop_coords`` divided by
the image size) and whether the crop was mirrored. With it, any grid laid over a view (the pixels, or
the stride-8 embedding grid) maps to source coordinates — cell ``(i, j)`` of an ``h x w`` grid sits at
``x = x0 + (j' + 0.5) / w * (x1 - x0)`` with ``j' = w - 1 - j`` when flipped — so:

- :func:`view_grid` gives each cell's source position;
- :func:`warp_to_view` samples a feature map of the *whole* source image (the CLIP teacher's) at
  those positions, i.e. warps it into the view's crop and flip;
- :func:`correspondence` gives, for every cell of view A, the cell of view B that sees the same source
  point (and whether B sees it at all).

Geometry is read from albumentations 2.0.8 (``save_applied_params=True``: ``RandomResizedCrop``'s
``crop_coords`` and whether ``HorizontalFlip`` was applied); photometric transforms run in a second
``Compose`` so they never touch geometry. :class:`TwoViewImages` is the training source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ovseg.data.sources import ImageFolder, SpecImages, TrainSource

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__all__ = ["TwoViews", "TwoViewImages", "view_grid", "warp_to_view", "warp_labels_to_view", "correspondence",
           "geometry_from_params", "REGIONS", "over_segment"]

#: ``regions`` of :class:`TwoViews`: the over-segmentation whose regions group CLIP-S4's positives (HSG uses
#: SE-OWT-UCM regions; scikit-image's SLIC and Felzenszwalb are the well-kept stand-ins), or none
REGIONS = ("slic", "felzenszwalb", "none")

X0, Y0, X1, Y1, FLIP = range(5)


def geometry_from_params(applied: list[tuple[str, dict]], height: int, width: int) -> np.ndarray:
    """albumentations ``applied_transforms`` of one call -> ``(x0, y0, x1, y1, flip)`` (float32)."""
    box = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float64)
    flip = 0.0
    for name, params in applied:
        if "crop_coords" in params:
            if flip:
                raise ValueError("a crop after a flip is not supported by the view geometry")
            x_min, y_min, x_max, y_max = params["crop_coords"]
            w0, h0 = box[2] - box[0], box[3] - box[1]
            # crops compose: the new box is relative to the current one (the only crop here is the first)
            box = np.array([box[0] + x_min / width * w0, box[1] + y_min / height * h0,
                            box[0] + x_max / width * w0, box[1] + y_max / height * h0])
        elif name == "HorizontalFlip":
            flip = 1.0 - flip
    return np.array([*box, flip], dtype=np.float32)


def view_grid(geometry: Tensor, height: int, width: int) -> Tensor:
    """Geometry ``[..., 5]`` -> normalised source ``(x, y)`` of each cell centre ``[..., height, width, 2]``."""
    geometry = geometry.float()
    lead = geometry.shape[:-1]
    g = geometry.reshape(-1, 5)
    j = (torch.arange(width, device=g.device, dtype=torch.float32) + 0.5) / width  # [w]
    i = (torch.arange(height, device=g.device, dtype=torch.float32) + 0.5) / height  # [h]
    flip = g[:, FLIP:FLIP + 1] > 0.5
    u = torch.where(flip, 1.0 - j, j)  # [n, w]
    x = g[:, X0:X0 + 1] + u * (g[:, X1:X1 + 1] - g[:, X0:X0 + 1])  # [n, w]
    y = g[:, Y0:Y0 + 1] + i * (g[:, Y1:Y1 + 1] - g[:, Y0:Y0 + 1])  # [n, h]
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)  # [n, h, w, 2]
    return grid.reshape(*lead, height, width, 2)


def warp_to_view(source_features: Tensor, geometry: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Features of whole source images ``[B, C, H, W]`` -> the same features seen through each view's
    crop and flip, on a ``size`` grid: ``[B, C, *size]``."""
    grid = view_grid(geometry, *size) * 2 - 1  # grid_sample's [-1, 1] with align_corners=False = pixel edges
    return F.grid_sample(source_features, grid.to(source_features.dtype), mode=mode, padding_mode="border",
                         align_corners=False)


def warp_labels_to_view(labels: Tensor, geometry: Tensor, size: tuple[int, int]) -> Tensor:
    """An integer label map of the whole source image ``[H, W]`` -> the label at each cell centre of views with
    ``geometry`` ``[V, 5]`` on a ``size`` grid: ``[V, *size]`` (nearest; labels below 2**24 stay exact in float32)."""
    source = labels.float()[None, None].expand(geometry.shape[0], 1, -1, -1)
    return warp_to_view(source, geometry, size, mode="nearest")[:, 0].round().long()


def over_segment(image: np.ndarray, method: str, count: int = 24, compactness: float = 10.0,
                 scale: float = 100.0) -> np.ndarray:
    """``HxWx3`` uint8 -> region labels ``[H, W]`` int32 from 0, by ``method`` (:data:`REGIONS` but ``none``):
    ``slic`` (about ``count`` superpixels of ``compactness``) or ``felzenszwalb`` (graph cut at ``scale``)."""
    from skimage.segmentation import felzenszwalb, slic

    if method == "slic":
        labels = slic(image, n_segments=count, compactness=compactness, start_label=0, channel_axis=-1)
    elif method == "felzenszwalb":
        labels = felzenszwalb(image, scale=scale, sigma=0.8, min_size=max(1, image.shape[0] * image.shape[1] // 400))
    else:
        raise ValueError(f"regions must be one of {REGIONS}, got {method!r}")
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.int32)


def correspondence(geometry_a: Tensor, geometry_b: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """For each cell of view A (``[B, h*w]``, row-major), the flat index of the cell of view B containing
    the same source point, and whether that point lies inside B's crop."""
    xy = view_grid(geometry_a, height, width)  # [B, h, w, 2]
    gb = geometry_b.float()[:, None, None, :]
    u = (xy[..., 0] - gb[..., X0]) / (gb[..., X1] - gb[..., X0])  # in [0, 1) inside B
    v = (xy[..., 1] - gb[..., Y0]) / (gb[..., Y1] - gb[..., Y0])
    u = torch.where(gb[..., FLIP] > 0.5, 1.0 - u, u)
    valid = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    col = (u * width).floor().clamp(0, width - 1).long()
    row = (v * height).floor().clamp(0, height - 1).long()
    index = row * width + col
    return index.flatten(1), valid.flatten(1)


class TwoViews:
    """Sample transform: ``{"image": HxWx3 uint8}`` -> two augmented views, their geometry and the
    un-augmented image for the CLIP teacher.

    Output: ``image`` uint8 ``[2, 3, S, S]``; ``geometry`` float32 ``[2, 5]``; ``teacher_image`` uint8
    ``[3, Ht, Wt]`` — the whole image resized so its short side is ``teacher_short_side`` (long side capped at
    ``teacher_long_side_max``), each side rounded to a multiple of ``teacher_multiple`` (the teacher's patch) so its
    features cover exactly the source extent ``[0, 1]``; ``regions`` int32 ``[Ht, Wt]``, the teacher image's
    over-segmentation (unless ``regions: none``).
    """

    def __init__(
        self,
        crop_size: int = 336,
        crop_scale: tuple[float, float] = (0.25, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        color_jitter: float = 0.4,
        color_jitter_p: float = 0.8,
        grayscale: float = 0.2,
        teacher_short_side: int = 336,
        teacher_long_side_max: int = 1344,
        teacher_multiple: int = 16,
        regions: str = "slic",
        region_count: int = 24,
        region_compactness: float = 10.0,
        region_scale: float = 100.0,
    ):
        """The two-view transform.

        Args:
            crop_size: view side (336 in CLIP-S4).
            crop_scale: ``RandomResizedCrop`` area fraction (R: (0.25, 1)).
            crop_ratio: ``RandomResizedCrop`` aspect range (R: (3/4, 4/3)).
            flip: random horizontal flips.
            color_jitter: brightness/contrast/saturation strength (hue = strength / 4); 0 disables (R: 0.4).
            color_jitter_p: probability of the jitter (R: 0.8).
            grayscale: probability of a grey view (R: 0.2).
            teacher_short_side: short side of the teacher's un-augmented image (R: the crop size).
            teacher_long_side_max: cap on its long side.
            teacher_multiple: its sides are rounded to this multiple (the teacher's patch size).
            regions: over-segmentation of the teacher image (:data:`REGIONS`), returned as ``regions`` (its labels at
                the teacher image's size): CLIP-S4's visually coherent regions, carried into both views by their
                geometry (:func:`warp_labels_to_view`). ``none`` leaves them out.
            region_count: SLIC's ``n_segments`` (R: 24).
            region_compactness: SLIC's ``compactness`` (scikit-image's default 10).
            region_scale: Felzenszwalb's ``scale``.
        """
        import albumentations as A

        if regions not in REGIONS:
            raise ValueError(f"regions must be one of {REGIONS}, got {regions!r}")
        self.regions, self.region_count = regions, region_count
        self.region_compactness, self.region_scale = region_compactness, region_scale

        self.crop_size = crop_size
        self.teacher_short_side = teacher_short_side
        self.teacher_long_side_max = teacher_long_side_max
        self.teacher_multiple = teacher_multiple
        geometric = [A.RandomResizedCrop(size=(crop_size, crop_size), scale=tuple(crop_scale), ratio=tuple(crop_ratio))]
        if flip:
            geometric.append(A.HorizontalFlip(p=0.5))
        # extra image-typed target: a coordinate map, to check the geometry independently (tests)
        self.geometric = A.Compose(geometric, save_applied_params=True, additional_targets={"coords": "image"})
        photometric = []
        if color_jitter > 0:
            photometric.append(A.ColorJitter(color_jitter, color_jitter, color_jitter, color_jitter / 4,
                                             p=color_jitter_p))
        if grayscale > 0:
            photometric.append(A.ToGray(p=grayscale))
        self.photometric = A.Compose(photometric) if photometric else None

    def _reseed(self) -> None:
        # albumentations keeps its own RNG (global seeds have no effect) and loader workers fork copies of it:
        # draw each call's seed from numpy's global stream, which seed_everything / seed_worker set per process.
        seed = int(np.random.randint(0, 2**31 - 1))
        self.geometric.set_random_seed(seed)
        if self.photometric is not None:
            self.photometric.set_random_seed(seed + 1)

    def view(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One view: (uint8 HxWx3 crop, geometry (5,))."""
        out = self.geometric(image=image)
        geometry = geometry_from_params(out["applied_transforms"], *image.shape[:2])
        crop = out["image"]
        if self.photometric is not None:
            crop = self.photometric(image=crop)["image"]
        return crop, geometry

    def teacher_size(self, height: int, width: int) -> tuple[int, int]:
        scale = self.teacher_short_side / min(height, width)
        scale = min(scale, self.teacher_long_side_max / max(height, width))
        m = self.teacher_multiple
        return max(m, round(height * scale / m) * m), max(m, round(width * scale / m) * m)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        import cv2

        image = np.ascontiguousarray(sample["image"])
        self._reseed()
        views, geometry = zip(*(self.view(image) for _ in range(2)))
        th, tw = self.teacher_size(*image.shape[:2])
        teacher = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA if th < image.shape[0] else cv2.INTER_LINEAR)
        regions = {}
        if self.regions != "none":
            labels = over_segment(teacher, self.regions, self.region_count, self.region_compactness, self.region_scale)
            regions["regions"] = torch.from_numpy(labels)
        return {
            **{k: v for k, v in sample.items() if k != "image"},
            "image": torch.from_numpy(np.stack(views).transpose(0, 3, 1, 2).copy()),
            "geometry": torch.from_numpy(np.stack(geometry)),
            "teacher_image": torch.from_numpy(teacher.transpose(2, 0, 1).copy()),
            **regions,
        }


class TwoViewImages(TrainSource):
    """CLIP-S4's training source: unlabelled images (a benchmark split, or a folder) as two views.

    Batches: ``image`` uint8 ``[B, 2, 3, S, S]`` (the DataModule turns it into floats in [0, 1]),
    ``geometry`` ``[B, 2, 5]``, ``teacher_image`` a list of B uint8 ``[3, Ht, Wt]`` (sizes differ), ``regions`` a list
    of B int32 ``[Ht, Wt]`` (unless ``regions: none``), ``meta``.
    """

    def __init__(
        self,
        dataset: str = "voc_aug",
        split: str = "trainaug",
        folder: str | None = None,
        limit: int | None = None,
        **views: Any,
    ):
        """A two-view training source.

        Args:
            dataset: the benchmark whose images are used (labels never read); ignored when ``folder`` is given.
            split: its split.
            folder: any image folder (relative to the data root or absolute) instead.
            limit: first N images only.
            views: the :class:`TwoViews` settings (``crop_size``, ``crop_scale``, ``color_jitter``, …).
        """
        self.views = TwoViews(**views)
        if folder is not None:
            self.source: TrainSource = ImageFolder(folder, limit=limit, transform=self.views)
        else:
            self.source = SpecImages(dataset, split, limit=limit, transform=self.views)

    def build(self, root: str | Path) -> Dataset:
        return self.source.build(root)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "geometry": torch.stack([s["geometry"] for s in samples]),
            "teacher_image": [s["teacher_image"] for s in samples],
            **({"regions": [s["regions"] for s in samples]} if "regions" in samples[0] else {}),
            "meta": [s["meta"] for s in samples],
        }

