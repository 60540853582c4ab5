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

Masks are decoded lazily (:meth:`PixelCLIPViews.crop_masks`): only those whose RLE box meets the crop, and only the
crop's columns, with resize, crop, flip and cutout folded into one gather; the result equals decoding everything
first (``mask_decoding: full``) bit for bit. Samples come from an extracted folder or straight from the SA-1B tar
files (:class:`~ovseg.data.sa1b.SA1BTars`), optionally halved at read time (``downscale``). Broken samples
(unreadable or oversized image, unreadable JSON, RLE size different from the image, garbage RLE strings, no masks)
raise :class:`DataError` naming the file (or tar member), or with ``skip_bad`` are skipped, counted
(``train/skipped_samples``, with those left out when indexing) and logged; an epoch without any mask stops the run.
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

from ovseg.data.sa1b import MaskRecord, SA1BFolder, SA1BTars, cv2_nearest_index, downscale_image
from ovseg.data.seg_dataset import DataError
from ovseg.data.sources import TrainSource
from ovseg.utils.geometry import keep_ratio_size

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
        """The augmentation settings (PixelCLIP's by default).

        Args:
            resize_short: the shortest edge is resized to this (1024) ...
            crop_size: ... then a random square of this side is cropped (640).
            ssd_color: SSD colour augmentation of the weak view (brightness, contrast, saturation, hue).
            flip_prob: probability of a horizontal flip (both views and the masks).
            strong: make the strong view (False: ``image_strong`` is the weak view).
            color_jitter: the strong view's colour jitter (brightness, contrast, saturation, hue).
            color_jitter_prob: probability of the colour jitter.
            grayscale_prob: probability of turning the strong view grey.
            blur_prob: probability of the strong view's Gaussian blur.
            blur_sigma: the blur's sigma range.
            cutout_scale: the cutout box's side range, as fractions of the crop.
            cutout_prob: probability of a cutout box (filled with 0 in the strong view).
            cutout_removes_masks: remove the cutout box from every mask (it is then unsupervised).
            mask_resolution: masks are resized (nearest) to this square (None: the crop's size).
            resize_long_max: the long side is capped at this in the shortest-edge resize (None: no cap).
            resize_library: ``pil`` (detectron2's resize then the crop, as the authors' mapper) or ``cv2`` (the crop
                cut in original coordinates, then cv2-resized).
        """
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
        one scale for both sides, the long-side cap folded into it, sides rounded). A resized side below the crop
        (aspect above ~2 with the cap) is taken whole, as :meth:`crop_offset` does, and stretched to the crop."""
        scale = self.resize_short / min(height, width)
        if self.resize_long_max is not None:
            scale = min(scale, self.resize_long_max / max(height, width))
        y0, x0, ch, cw = self.crop_offset(round(height * scale), round(width * scale), rng)
        box = (x0 / scale, y0 / scale, (x0 + cw) / scale, (y0 + ch) / scale)
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

    def _pil_geometry(self, image: np.ndarray, rng: np.random.Generator):
        """detectron2's ResizeShortestEdge (PIL bilinear on the uint8 image) then the random crop, as the authors'
        SA-1B mapper applies them; the masks' source rows/columns follow PIL's nearest rule on the crop only."""
        from PIL import Image

        height, width = image.shape[:2]
        rh, rw = self.resized_shape(height, width)
        y0, x0, ch, cw = self.crop_offset(rh, rw, rng)
        resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))
        weak = np.ascontiguousarray(resized[y0:y0 + ch, x0:x0 + cw])
        rows = pil_nearest_index(height, rh)[y0:y0 + ch]
        cols = pil_nearest_index(width, rw)[x0:x0 + cw]
        size = (self.crop_size, self.crop_size)
        if (ch, cw) != size:  # resized side below the crop (aspect > ~2): theirs keeps it and pads the batch
            weak = cv2.resize(weak, size, interpolation=cv2.INTER_LINEAR)
            rows, cols = rows[torch_nearest_index(ch, self.crop_size)], cols[torch_nearest_index(cw, self.crop_size)]
        return weak, rows, cols

    def _cv2_geometry(self, image: np.ndarray, rng: np.random.Generator):
        """The crop cut from the original image (original coordinates, rounded) and cv2-resized; masks torch-nearest."""
        height, width = image.shape[:2]
        x0, y0, x1, y1 = self.crop_window(height, width, rng)
        weak = cv2.resize(np.ascontiguousarray(image[y0:y1, x0:x1]), (self.crop_size, self.crop_size),
                          interpolation=cv2.INTER_LINEAR)
        rows = y0 + torch_nearest_index(y1 - y0, self.crop_size)
        return weak, rows, x0 + torch_nearest_index(x1 - x0, self.crop_size)

    def __call__(self, image: np.ndarray, masks: np.ndarray | MaskRecord | None,
                 rng: np.random.Generator) -> dict[str, Any]:
        """``masks``: bool [N, H, W] (any order; sorted largest first here) or the image's :class:`MaskRecord`
        (decoded here, only the masks and columns the crop needs)."""
        geometry = self._pil_geometry if self.resize_library == "pil" else self._cv2_geometry
        weak, rows, cols = geometry(image, rng)
        if self.ssd_color:
            weak = ssd_color_augment(weak, rng)
        flip = rng.random() < self.flip_prob
        if flip:
            weak = np.ascontiguousarray(weak[:, ::-1])
            cols = cols[::-1]
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
        if masks is not None:
            removed = cut if self.strong and self.cutout_removes_masks else (0, 0, 0, 0)
            out["masks"] = self.crop_masks(masks, rows, cols, removed)
        return out

    def crop_masks(self, masks: np.ndarray | MaskRecord, rows: np.ndarray, cols: np.ndarray,
                   removed: tuple[int, int, int, int]) -> torch.Tensor:
        """The masks of the view, bool [n, R, R] at ``mask_resolution``, largest first: crop pixel (i, j) is source
        pixel (``rows[i]``, ``cols[j]``) (resize, crop and flip folded into one gather); pixels in the ``removed``
        box (x0, y0, x1, y1, crop coordinates) are cleared and masks with no pixel left in the crop are dropped.

        Only masks whose box meets the crop are decoded, and of those only the crop's columns
        (:meth:`MaskRecord.decode_columns`); the result is the same as decoding everything, resizing, cropping,
        flipping, clearing and nearest-resizing to R (``tests/unit/test_sa1b_views.py`` checks it bit for bit).
        """
        res = self.mask_resolution or self.crop_size
        if isinstance(masks, MaskRecord):
            order = masks.largest_first()
            x, y, w, h = masks.boxes()[order].T  # in the RLE's pixels (the image's before a read-time resize)
            top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
            if masks.pixel_rows is not None:
                top, bottom = masks.pixel_rows[top], masks.pixel_rows[bottom]
                left, right = masks.pixel_cols[left], masks.pixel_cols[right]
            meets = (w > 0) & (x <= right) & (x + w > left) & (y <= bottom) & (y + h > top)
            order = order[meets]
            col_start, col_stop = int(cols.min()), int(cols.max()) + 1
            # [n, H, C] view of column-major memory (the image's rows and columns): the gathers below read down
            # columns
            block = masks.decode_columns(order, col_start, col_stop)
        else:
            areas = masks.reshape(len(masks), -1).sum(axis=1)
            block, col_start = masks[np.argsort(-areas, kind="stable")], 0
        cols = cols - col_start
        x0, y0, x1, y1 = removed
        # a mask survives if it has a pixel in a row outside the removed box, or in a column outside it
        kept_rows = np.concatenate((rows[:y0], rows[y1:]))
        kept_cols = np.concatenate((cols[:x0], cols[x1:]))
        alive = _any_in(block, kept_rows, cols) | _any_in(block, rows, kept_cols)
        pick = torch_nearest_index(self.crop_size, res)
        out = _gather(block, np.flatnonzero(alive), rows[pick], cols[pick])
        # the removed box at R: the output rows/columns whose crop pixel lies in it (pick is monotone)
        ry0, ry1 = np.searchsorted(pick, (y0, y1))
        rx0, rx1 = np.searchsorted(pick, (x0, x1))
        out[:, ry0:ry1, rx0:rx1] = 0
        return torch.from_numpy(out).bool()


def torch_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel of ``F.interpolate(mode="nearest")`` along one axis (read off torch itself
    on an index ramp, so it is torch's rule by construction)."""
    if n_in == n_out:
        return np.arange(n_in)
    ramp = torch.arange(n_in, dtype=torch.float64).view(1, 1, 1, n_in)
    return F.interpolate(ramp, size=(1, n_out), mode="nearest")[0, 0, 0].long().numpy()


def _progressions(index: np.ndarray, limit: int = 8) -> list[slice] | None:
    """Sorted unique ``index`` values as at most ``limit`` slices with a step (arithmetic progressions: a crop
    upsampled from the source uses a range of rows, one downscaled at read time every other row), or None."""
    values = np.unique(index)
    out: list[slice] = []
    start = 0
    while start < len(values):
        if start == len(values) - 1:
            out.append(slice(int(values[start]), int(values[start]) + 1))
            break
        gaps = np.diff(values[start:])
        step = gaps[0]
        other = np.flatnonzero(gaps != step)
        last = start + (int(other[0]) if len(other) else len(gaps))
        out.append(slice(int(values[start]), int(values[last]) + 1, int(step)))
        if len(out) > limit:
            return None
        start = last + 1
    return out


def _any_in(block: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Per mask of ``block`` [n, H, W]: any pixel set at (r, c) for r in ``rows``, c in ``cols`` — as a few strided
    views (no copy) or, for irregular index sets, one gather."""
    hit = np.zeros(len(block), dtype=bool)
    if not len(block) or not len(rows) or not len(cols):
        return hit
    row_slices, col_slices = _progressions(rows), _progressions(cols)
    if row_slices is None or col_slices is None:
        return block[:, np.unique(rows)[:, None], np.unique(cols)[None, :]].any(axis=(1, 2))
    for row_slice in row_slices:
        for col_slice in col_slices:
            hit |= block[:, row_slice, col_slice].any(axis=(1, 2))
    return hit


def _gather(block: np.ndarray, masks: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``block[masks][:, rows][:, :, cols]`` as a C-contiguous uint8 array; columns are taken first, from the
    column-major memory the RLE decode gives (``block`` is its [n, H, W] view)."""
    by_column = block.transpose(0, 2, 1)
    picked = np.take(np.take(by_column, masks, axis=0), cols, axis=1)
    return np.ascontiguousarray(np.take(picked, rows, axis=2).transpose(0, 2, 1)).view(np.uint8)


# -- dataset --------------------------------------------------------------------------------------------------------
class SA1BDataset(Dataset):
    """Map-style SA-1B dataset over a sample reader (:class:`SA1BFolder` or :class:`SA1BTars`); ``skipped``
    counts the samples skipped in this process (or loader worker)."""

    def __init__(self, name: str, files: SA1BFolder | SA1BTars, views: PixelCLIPViews, skip_bad: bool = True,
                 downscale: float | None = None, mask_decoding: str = "crop"):
        """The samples of a reader, through the views.

        Args:
            name: the dataset's name in the samples' ``meta``.
            files: the sample reader.
            views: the augmentations each sample goes through.
            skip_bad: skip, count and log broken samples (False: raise naming the file).
            downscale: resize images and masks by this factor at read time (None: as stored).
            mask_decoding: ``crop`` (decode what the crop needs) or ``full`` (decode every mask first).
        """
        if not len(files):
            raise DataError(f"training source {name!r}: no images with mask JSONs")
        if mask_decoding not in MASK_DECODINGS:
            raise ValueError(f"mask_decoding must be one of {MASK_DECODINGS}, got {mask_decoding!r}")
        self.name, self.files, self.views, self.skip_bad = name, files, views, skip_bad
        self.downscale, self.mask_decoding = downscale, mask_decoding
        self.skipped = 0
        self.consecutive_skips = 0

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """The reader's (ids and sizes of the samples)."""
        return self.files.fingerprint()

    @property
    def left_out(self) -> int:
        """Samples the reader left out when indexing (an image without its JSON, a member cut off a tar)."""
        return int(getattr(self.files, "left_out", 0))

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        image, masks = self.files.read(index)
        if self.downscale is not None and self.downscale != 1:
            # as `ovseg masks downscale` ahead of time (bar its JPEG re-encoding): the image resized, the masks
            # nearest-resized, folded into the crop's gather
            height, width = image.shape[:2]
            image = downscale_image(image, self.downscale)
            if masks is not None:
                masks.pixel_rows = cv2_nearest_index(height, image.shape[0])
                masks.pixel_cols = cv2_nearest_index(width, image.shape[1])
        if masks is not None and self.mask_decoding == "full":
            masks = masks.decode_at_image_size()
        sample = self.views(image, masks, rng)
        sample["meta"] = {"dataset": self.name, "image_path": self.files.where(index), "index": index}
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
            where = self.files.where(index)
            log.warning("SA-1B: skipping %s (%d skipped so far in this process): %s", where, self.skipped, e)
            if self.consecutive_skips > MAX_CONSECUTIVE_SKIPS:
                raise DataError(f"training source {self.name!r}: {self.consecutive_skips} broken samples in a row, "
                                f"the last {where}; is the data intact?") from None
            return {SKIPPED: where}
        self.consecutive_skips = 0
        return sample


#: ``layout`` of an SA-1B source: ``folder`` = extracted ``sa_N.jpg`` + ``sa_N.json``; ``tar`` = the downloaded
#: ``sa_XXXXXX.tar`` files read in place; ``auto`` = ``tar`` when the folder holds .tar files
LAYOUTS = ("auto", "folder", "tar")
#: ``mask_decoding``: ``crop`` = only the masks and columns a crop needs (fast); ``full`` = every mask at full size
#: first (the straightforward way, same output; for comparisons and benchmarks)
MASK_DECODINGS = ("crop", "full")


class SA1B(TrainSource):
    """SA-1B (or SAM/DINO-generated, same JSON format) images with masks, as PixelCLIP trains on them."""

    def __init__(
        self,
        folder: str = "sa1b",
        layout: str = "auto",
        annotations: bool = True,
        limit: int | None = None,
        downscale: float | None = None,
        tar_index_dir: str | None = None,
        mask_decoding: str = "crop",
        skip_bad: bool = True,
        **views: Any,
    ):
        """Where the images and masks are, how they are read.

        Args:
            folder: the data folder, relative to the data root or absolute (searched recursively).
            layout: ``folder`` (extracted image/JSON pairs), ``tar`` (the SA-1B tar files as downloaded, read in
                place), or ``auto``.
            annotations: read the masks (False: images only, e.g. for ``masks: dino`` PixelCLIP runs).
            limit: use the first N images (sorted by path / tar order).
            downscale: resize images and masks by this factor at read time, as ``ovseg masks downscale`` does ahead
                of time (0.5: the authors' halving of SA-1B).
            tar_index_dir: keep each tar's member index here (relative to the root or absolute), so later runs skip
                scanning the tar headers.
            mask_decoding: ``crop`` (decode what the crop needs) or ``full`` (decode every mask first); same output.
            skip_bad: skip, count and log broken samples (False: raise naming the file).
            **views: the :class:`PixelCLIPViews` settings (``resize_short``, ``crop_size``, ``resize_long_max``,
                ``resize_library``, …; PixelCLIP's defaults).
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if mask_decoding not in MASK_DECODINGS:
            raise ValueError(f"mask_decoding must be one of {MASK_DECODINGS}, got {mask_decoding!r}")
        if downscale is not None and not 0 < downscale <= 1:
            raise ValueError(f"downscale must be in (0, 1], got {downscale}")
        self.folder, self.layout, self.annotations, self.limit = folder, layout, annotations, limit
        self.downscale, self.tar_index_dir, self.mask_decoding = downscale, tar_index_dir, mask_decoding
        self.skip_bad = skip_bad
        self.views = PixelCLIPViews(**views)

    @staticmethod
    def _resolve(path: str, root: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(root) / p

    def build(self, root: str | Path) -> SA1BDataset:
        folder = self._resolve(self.folder, root)
        if not folder.is_dir() and Path(self.folder).is_dir():
            folder = Path(self.folder)
        if not folder.is_dir():
            raise DataError(f"SA-1B folder not found: {folder}")
        layout = self.layout
        if layout == "auto":
            layout = "tar" if next(folder.rglob("*.tar"), None) is not None else "folder"
        if layout == "tar":
            index_dir = self._resolve(self.tar_index_dir, root) if self.tar_index_dir else None
            files: SA1BFolder | SA1BTars = SA1BTars(folder, self.annotations, index_dir, self.skip_bad)
        else:
            files = SA1BFolder(folder, self.annotations)  # warns about images without a JSON
        files.limit(self.limit)
        return SA1BDataset(f"sa1b:{self.folder}", files, self.views, self.skip_bad, self.downscale,
                           self.mask_decoding)

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
