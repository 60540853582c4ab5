"""PixelCLIP's training data recipe: SA-1B-format images and masks (:mod:`ovseg.data.sa1b`) as weak and strong
views, the ``SA1B`` training source of PixelCLIP configs.

A sample (``SA1B`` source, ``PixelCLIPViews`` transform):

- shared geometry: shortest edge resized to ``resize_short`` (1024) with the long side capped at
  ``resize_long_max`` (1333; detectron2's ``ResizeShortestEdge`` size rule, PIL bilinear / nearest as the authors'
  mapper), a random ``crop_size`` (640) square, SSD colour augmentation, random horizontal flip -> ``image``
  (the weak view, teacher side);
- ``image_strong``: colour jitter, grayscale, Gaussian blur, and a cutout box filled with 0 (student side); the
  cutout is also removed from every mask, so it is unsupervised;
- ``masks``: bool [N, R, R] at ``mask_resolution`` (nearest), largest first, crowd masks dropped, masks emptied by
  the crop/cutout dropped.

RLE is decoded once per sample (one ``pycocotools.mask.decode`` call for all masks, cropped before resizing);
``cache_dir`` keeps the decoded masks bit-packed so later epochs skip the decoding. Broken samples (unreadable
image or JSON, RLE size different from the image, no masks) raise :class:`DataError` naming the file, or with
``skip_bad`` are skipped, counted and logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ovseg.data.sa1b import find_pairs, load_masks
from ovseg.data.seg_dataset import DataError, read_image
from ovseg.data.sources import TrainSource
from ovseg.utils.geometry import keep_ratio_size
from ovseg.utils.io import atomic_open

__all__ = ["SA1B", "SA1BDataset", "PixelCLIPViews", "ssd_color_augment", "pil_nearest_index", "collate_views"]

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_SKIPS = 50
#: key of the stand-in a broken sample becomes with ``skip_bad`` (its image path as value)
SKIPPED = "skipped"


# -- augmentation ---------------------------------------------------------------------------------------------------
def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def ssd_color_augment(image: np.ndarray, rng: np.random.Generator, brightness_delta: float = 32.0,
                      contrast: tuple[float, float] = (0.5, 1.5), saturation: tuple[float, float] = (0.5, 1.5),
                      hue_delta: int = 18) -> np.ndarray:
    """SSD photometric distortion (detectron2's ``ColorAugSSDTransform``) on an RGB uint8 image: brightness,
    then contrast before or after saturation+hue, each applied with probability 1/2."""

    def do_contrast(img):
        return _convert(img, alpha=rng.uniform(*contrast)) if rng.random() < 0.5 else img

    def do_saturation_hue(img):
        sat, hue = rng.random() < 0.5, rng.random() < 0.5
        if not (sat or hue):
            return img
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        if sat:
            hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(*saturation))
        if hue:
            hsv[:, :, 0] = ((hsv[:, :, 0].astype(int) + int(rng.integers(-hue_delta, hue_delta + 1))) % 180)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    if rng.random() < 0.5:
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    if rng.random() < 0.5:
        return do_saturation_hue(do_contrast(image))
    return do_contrast(do_saturation_hue(image))


#: ``resize_library`` of the shared geometry: ``pil`` = detectron2's ``ResizeTransform`` on uint8 images (PIL bilinear,
#: masks PIL nearest) then the crop, as the authors' mapper; ``cv2`` = crop in original coordinates, cv2 bilinear
RESIZE_LIBRARIES = ("pil", "cv2")


def pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel of PIL's ``resize(..., NEAREST)`` along one axis (Pillow's
    ``ImagingScaleAffine``: ``xo = scale/2``, ``int(xo)``, ``xo += scale``, in double precision)."""
    scale = n_in / n_out
    steps = np.full(n_out, scale, dtype=np.float64)
    steps[0] = scale * 0.5
    return np.minimum(np.cumsum(steps).astype(np.int64), n_in - 1)


class PixelCLIPViews:
    """Weak and strong views of an image and its masks (see the module docstring). All numbers are settings
    with PixelCLIP's defaults."""

    def __init__(
        self,
        resize_short: int = 1024,
        crop_size: int = 640,
        ssd_color: bool = True,
        flip_prob: float = 0.5,
        strong: bool = True,
        color_jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        cutout_scale: tuple[float, float] = (0.1, 0.5),
        cutout_prob: float = 1.0,
        cutout_removes_masks: bool = True,
        mask_resolution: int | None = 256,
        resize_long_max: int | None = 1333,
        resize_library: str = "pil",
    ):
        if resize_short < crop_size:
            raise ValueError(f"resize_short ({resize_short}) must be at least crop_size ({crop_size})")
        if resize_library not in RESIZE_LIBRARIES:
            raise ValueError(f"resize_library must be one of {RESIZE_LIBRARIES}, got {resize_library!r}")
        self.resize_short, self.crop_size = resize_short, crop_size
        self.resize_long_max, self.resize_library = resize_long_max, resize_library
        self.ssd_color, self.flip_prob, self.strong = ssd_color, flip_prob, strong
        self.cutout_scale, self.cutout_prob = tuple(cutout_scale), cutout_prob
        self.cutout_removes_masks, self.mask_resolution = cutout_removes_masks, mask_resolution
        import albumentations as A

        b, c, s, h = color_jitter
        self.photometric = A.Compose([
            A.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h, p=color_jitter_prob),
            A.ToGray(p=grayscale_prob),
            A.GaussianBlur(blur_limit=0, sigma_limit=tuple(blur_sigma), p=blur_prob),
        ])

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the shortest-edge resize with the long-side cap (detectron2's size rule)."""
        return keep_ratio_size(height, width, self.resize_short, self.resize_long_max, rule="detectron2")

    def crop_offset(self, rh: int, rw: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(y0, x0, crop h, crop w) of the random crop in the resized ``rh``×``rw`` image: detectron2's
        ``RandomCrop("absolute")`` (crop = min(size, side); offsets ``randint(side - crop + 1)``, rows first)."""
        ch, cw = min(self.crop_size, rh), min(self.crop_size, rw)
        y0 = int(rng.integers(0, rh - ch + 1))
        x0 = int(rng.integers(0, rw - cw + 1))
        return y0, x0, ch, cw

    def crop_window(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The crop of the resized image, in original pixel coordinates (x0, y0, x1, y1) (``resize_library="cv2"``:
        one scale for both sides, the long-side cap folded into it, sides rounded)."""
        scale = self.resize_short / min(height, width)
        if self.resize_long_max is not None:
            scale = min(scale, self.resize_long_max / max(height, width))
        rh, rw = round(height * scale), round(width * scale)
        y0 = int(rng.integers(0, rh - self.crop_size + 1))
        x0 = int(rng.integers(0, rw - self.crop_size + 1))
        box = (x0 / scale, y0 / scale, (x0 + self.crop_size) / scale, (y0 + self.crop_size) / scale)
        x_0, y_0 = int(np.floor(box[0])), int(np.floor(box[1]))
        x_1, y_1 = min(width, max(x_0 + 1, int(round(box[2])))), min(height, max(y_0 + 1, int(round(box[3]))))
        return x_0, y_0, x_1, y_1

    def cutout_box(self, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a box of U(scale)·H × U(scale)·W fully inside the crop."""
        size = self.crop_size
        if rng.random() >= self.cutout_prob:
            return 0, 0, 0, 0
        bh = int(size * rng.uniform(*self.cutout_scale))
        bw = int(size * rng.uniform(*self.cutout_scale))
        y0 = int(rng.integers(0, size - bh + 1))
        x0 = int(rng.integers(0, size - bw + 1))
        return x0, y0, x0 + bw, y0 + bh

    def _pil_geometry(self, image: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator):
        """detectron2's ResizeShortestEdge (PIL bilinear on the uint8 image, PIL nearest on the masks) then the random
        crop, as the authors' SA-1B mapper applies them; masks are gathered by PIL's nearest rule, crop only."""
        from PIL import Image

        height, width = image.shape[:2]
        rh, rw = self.resized_shape(height, width)
        y0, x0, ch, cw = self.crop_offset(rh, rw, rng)
        resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))
        weak = np.ascontiguousarray(resized[y0:y0 + ch, x0:x0 + cw])
        size = (self.crop_size, self.crop_size)
        if (ch, cw) != size:  # resized side below the crop (aspect > ~2): theirs keeps it and pads the batch
            weak = cv2.resize(weak, size, interpolation=cv2.INTER_LINEAR)
        crop = None
        if masks is not None:
            rows = pil_nearest_index(height, rh)[y0:y0 + ch]
            cols = pil_nearest_index(width, rw)[x0:x0 + cw]
            crop = torch.from_numpy(np.ascontiguousarray(masks[:, rows[:, None], cols[None, :]])).to(torch.uint8)
            if (ch, cw) != size and len(crop):
                crop = F.interpolate(crop[None], size=size, mode="nearest")[0]
        return weak, crop

    def _cv2_geometry(self, image: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator):
        """The crop cut from the original image (original coordinates, rounded) and cv2-resized; masks torch-nearest."""
        height, width = image.shape[:2]
        x0, y0, x1, y1 = self.crop_window(height, width, rng)
        size = (self.crop_size, self.crop_size)
        weak = cv2.resize(np.ascontiguousarray(image[y0:y1, x0:x1]), size, interpolation=cv2.INTER_LINEAR)
        crop = None
        if masks is not None:
            crop = masks[:, y0:y1, x0:x1]
            crop = torch.from_numpy(np.ascontiguousarray(crop)).to(torch.uint8)
            # nearest resize of the crop (only the crop: SA-1B images are 1500×2250 with ~100 masks)
            crop = F.interpolate(crop[None], size=size, mode="nearest")[0] if len(crop) else crop.new_zeros(0, *size)
        return weak, crop

    def __call__(self, image: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator) -> dict[str, Any]:
        geometry = self._pil_geometry if self.resize_library == "pil" else self._cv2_geometry
        weak, crop = geometry(image, masks, rng)
        if self.ssd_color:
            weak = ssd_color_augment(weak, rng)
        flip = rng.random() < self.flip_prob
        if flip:
            weak = np.ascontiguousarray(weak[:, ::-1])
        out: dict[str, Any] = {}
        cut = (0, 0, 0, 0)
        if self.strong:
            self.photometric.set_random_seed(int(rng.integers(0, 2**31 - 1)))
            strong = self.photometric(image=weak)["image"].copy()
            cut = self.cutout_box(rng)
            strong[cut[1]:cut[3], cut[0]:cut[2]] = 0
            out["image_strong"] = torch.from_numpy(np.ascontiguousarray(strong.transpose(2, 0, 1)))
        out["image"] = torch.from_numpy(np.ascontiguousarray(weak.transpose(2, 0, 1)))
        out["cutout"] = torch.tensor(cut, dtype=torch.int64)
        if crop is not None:
            if flip:
                crop = crop.flip(-1)
            if self.strong and self.cutout_removes_masks:
                crop[:, cut[1]:cut[3], cut[0]:cut[2]] = 0
            crop = crop[crop.flatten(1).amax(dim=1) > 0] if len(crop) else crop  # masks emptied by crop/cutout
            if self.mask_resolution and self.mask_resolution != self.crop_size and len(crop):
                res = (self.mask_resolution, self.mask_resolution)
                crop = F.interpolate(crop[None], size=res, mode="nearest")[0]
            out["masks"] = crop.bool()
        return out


# -- dataset --------------------------------------------------------------------------------------------------------
class SA1BDataset(Dataset):
    """Map-style SA-1B dataset; ``skipped`` counts the samples skipped in this process (or loader worker)."""

    def __init__(self, name: str, pairs: list[tuple[Path, Path | None]], views: PixelCLIPViews,
                 annotations: bool = True, cache_dir: Path | None = None, skip_bad: bool = True,
                 folder: Path | None = None):
        if not pairs:
            raise DataError(f"training source {name!r}: no images with mask JSONs")
        self.name, self.pairs, self.views = name, pairs, views
        self.annotations, self.cache_dir, self.skip_bad = annotations, cache_dir, skip_bad
        self.folder = folder
        self.skipped = 0
        self.consecutive_skips = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def _cache_path(self, json_path: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        try:
            rel = json_path.relative_to(self.folder) if self.folder else Path(json_path.name)
        except ValueError:
            rel = Path(json_path.name)
        return self.cache_dir / rel.with_suffix(".masks.npz")

    def masks_for(self, json_path: Path, height: int, width: int) -> np.ndarray:
        """Decoded masks, through the bit-packed cache when ``cache_dir`` is set."""
        cache = self._cache_path(json_path)
        if cache is not None and cache.is_file():
            try:
                with np.load(cache) as data:
                    shape = tuple(int(v) for v in data["shape"])
                    if shape[1:] == (height, width):
                        bits = np.unpackbits(data["bits"], axis=-1, count=width)
                        return bits.reshape(shape).astype(bool)
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache entry: decode again and overwrite it
        masks = load_masks(json_path, height, width)
        if cache is not None:
            with atomic_open(cache, "wb") as f:
                np.savez(f, bits=np.packbits(masks, axis=-1), shape=np.array(masks.shape))
        return masks

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        image_path, json_path = self.pairs[index]
        image = read_image(image_path)
        masks = self.masks_for(json_path, *image.shape[:2]) if self.annotations else None
        sample = self.views(image, masks, rng)
        sample["meta"] = {"dataset": self.name, "image_path": str(image_path), "index": index}
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample, or with ``skip_bad`` a :data:`SKIPPED` marker for a broken one: the batch is built without it
        (:func:`collate_views`) rather than from a neighbour that would then be trained on twice."""
        rng = np.random.default_rng(int(np.random.randint(0, 2**31 - 1)))
        try:
            sample = self.load(index, rng)
        except DataError as e:
            if not self.skip_bad:
                raise
            self.skipped += 1
            self.consecutive_skips += 1
            log.warning("SA-1B: skipping %s (%d skipped so far in this process): %s",
                        self.pairs[index][0], self.skipped, e)
            if self.consecutive_skips > MAX_CONSECUTIVE_SKIPS:
                raise DataError(f"training source {self.name!r}: {self.consecutive_skips} broken samples in a row, "
                                f"the last {self.pairs[index][0]}; is the folder intact?") from None
            return {SKIPPED: str(self.pairs[index][0])}
        self.consecutive_skips = 0
        return sample


class SA1B(TrainSource):
    """SA-1B (or SAM/DINO-generated, same JSON format) images with masks, as PixelCLIP trains on them.

    Args:
        folder: the image/JSON folder, relative to the data root or absolute (searched recursively).
        annotations: read the masks (False: images only, e.g. for ``masks: dino`` PixelCLIP runs).
        limit: use the first N images (sorted by path).
        cache_dir: keep decoded masks (bit-packed ``.npz``) here, relative to the root or absolute.
        skip_bad: skip, count and log broken samples (False: raise naming the file).
        views: the :class:`PixelCLIPViews` settings (``resize_short``, ``crop_size``, ``resize_long_max``,
            ``resize_library``, …; PixelCLIP's defaults).
    """

    def __init__(
        self,
        folder: str = "sa1b",
        annotations: bool = True,
        limit: int | None = None,
        cache_dir: str | None = None,
        skip_bad: bool = True,
        **views: Any,
    ):
        self.folder, self.annotations, self.limit = folder, annotations, limit
        self.cache_dir, self.skip_bad = cache_dir, skip_bad
        self.views = PixelCLIPViews(**views)

    @staticmethod
    def _resolve(path: str, root: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(root) / p

    def build(self, root: str | Path) -> SA1BDataset:
        folder = self._resolve(self.folder, root)
        if not folder.is_dir() and Path(self.folder).is_dir():
            folder = Path(self.folder)
        pairs, missing = find_pairs(folder, require_json=self.annotations)
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            log.warning("SA-1B: skipping %d image(s) without a mask JSON under %s: %s%s", len(missing), folder,
                        shown, " ..." if len(missing) > 5 else "")
        pairs = pairs[: self.limit]
        cache = self._resolve(self.cache_dir, root) if self.cache_dir else None
        dataset = SA1BDataset(f"sa1b:{self.folder}", pairs, self.views, self.annotations, cache, self.skip_bad,
                              folder)
        dataset.missing_json = len(missing)
        return dataset

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_views(samples)


def collate_views(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the views; broken samples (:data:`SKIPPED`) are left out and counted in ``batch["skipped"]``."""
    skipped = sum(SKIPPED in s for s in samples)
    samples = [s for s in samples if SKIPPED not in s]
    if not samples:
        raise DataError(f"every sample of a training batch is broken ({skipped}); see the warnings above")
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples]),
                             "cutout": torch.stack([s["cutout"] for s in samples]),
                             "meta": [s["meta"] for s in samples], "skipped": skipped}
    if "image_strong" in samples[0]:
        batch["image_strong"] = torch.stack([s["image_strong"] for s in samples])
    if "masks" in samples[0]:
        batch["masks"] = [s["masks"] for s in samples]
    return batch
