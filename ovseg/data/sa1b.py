"""SA-1B-format files: images with class-agnostic masks (PixelCLIP's training data; the recipe that turns them into
training views is :mod:`ovseg.methods.pixelclip.data`).

Layout: any folder (searched recursively) of ``<name>.jpg`` + ``<name>.json`` pairs, as extracted from the
SA-1B tar files (``sa_000000/sa_1.jpg`` + ``sa_1.json``) or written by ``ovseg masks sam|dino|downscale``.
Each JSON is ``{"image": {...}, "annotations": [{"segmentation": {"size": [h, w], "counts": str}, ...}]}``.
Broken files (unreadable JSON, RLE size different from the image, no masks) raise :class:`DataError` naming the
file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ovseg.data.files import DataError
from ovseg.utils.io import atomic_open

__all__ = ["IMAGE_SUFFIXES", "find_pairs", "encode_mask", "decode_masks", "load_masks", "write_synthetic_sa1b"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# -- files ----------------------------------------------------------------------------------------------------------
def find_pairs(folder: str | Path, require_json: bool = True) -> tuple[list[tuple[Path, Path | None]], list[Path]]:
    """(image, json) pairs under ``folder`` sorted by path, and the images that have no JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"SA-1B folder not found: {folder}")
    pairs, missing = [], []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        ann = image.with_suffix(".json")
        if ann.is_file():
            pairs.append((image, ann))
        elif require_json:
            missing.append(image)
        else:
            pairs.append((image, None))
    return pairs, missing


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A binary mask [H,W] -> COCO RLE with str counts (the SA-1B JSON form)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_masks(rles: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """COCO RLEs -> bool masks [N, H, W] in one pycocotools call."""
    from pycocotools import mask as mask_utils

    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    rles = [{"size": list(r["size"]), "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str)
             else r["counts"]} for r in rles]
    decoded = mask_utils.decode(rles)  # [H, W, N] uint8, Fortran order
    return np.ascontiguousarray(decoded.transpose(2, 0, 1)).astype(bool)


def load_masks(json_path: str | Path, height: int, width: int) -> np.ndarray:
    """The non-crowd masks of one SA-1B JSON as bool [N, H, W], largest first.

    Raises :class:`DataError` naming the file for unreadable JSON, a missing ``annotations`` list, an RLE whose
    size differs from the image's ``height`` × ``width``, or no masks at all.
    """
    json_path = Path(json_path)
    try:
        with open(json_path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{json_path}: mask JSON not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path}: cannot parse mask JSON ({e})") from None
    annotations = record.get("annotations") if isinstance(record, dict) else None
    if not isinstance(annotations, list):
        raise DataError(f"{json_path}: no 'annotations' list (not an SA-1B mask file)")
    rles, areas = [], []
    for i, ann in enumerate(annotations):
        if ann.get("iscrowd", 0):
            continue
        seg = ann.get("segmentation")
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise DataError(f"{json_path}: annotation {i} has no COCO RLE segmentation")
        if [int(v) for v in seg["size"]] != [height, width]:
            raise DataError(f"{json_path}: annotation {i} has RLE size {list(seg['size'])} but the image is "
                            f"{height}x{width}")
        rles.append(seg)
        areas.append(float(ann["area"]) if "area" in ann else None)
    if not rles:
        raise DataError(f"{json_path}: image has zero masks")
    try:
        masks = decode_masks(rles, height, width)
    except Exception as e:  # pycocotools raises bare errors on malformed counts
        raise DataError(f"{json_path}: cannot decode RLE ({e})") from None
    pixel_areas = masks.reshape(len(masks), -1).sum(axis=1)
    order = np.argsort(-pixel_areas, kind="stable")  # largest first
    return masks[order]


# -- synthetic data (tests, demo) -----------------------------------------------------------------------------------
def write_synthetic_sa1b(folder: str | Path, num_images: int = 4, size: tuple[int, int] = (48, 64),
                         masks_per_image: tuple[int, int] = (3, 6), seed: int = 0, images_per_tar: int = 2,
                         full_cover: bool = False) -> list[Path]:
    """Images and SA-1B JSONs (COCO RLE via pycocotools) in the extracted-tar layout
    ``sa_00000k/sa_N.jpg`` + ``sa_N.json``. Masks are rectangles and ellipses (they may overlap); with
    ``full_cover`` one extra mask covers what the others leave. Returns the image paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    written = []
    for n in range(num_images):
        sub = folder / f"sa_{n // images_per_tar:06d}"
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        masks = []
        for _ in range(int(rng.integers(masks_per_image[0], masks_per_image[1] + 1))):
            cy, cx = rng.integers(0, height), rng.integers(0, width)
            ry, rx = rng.integers(height // 8 + 1, height // 2 + 1), rng.integers(width // 8 + 1, width // 2 + 1)
            if rng.random() < 0.5:
                mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            else:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            masks.append(mask)
            image[mask] = (image[mask] // 4 + rng.integers(0, 192, 3)).astype(np.uint8)
        if full_cover:
            rest = ~np.any(masks, axis=0)
            if rest.any():
                masks.append(rest)
        image_path = sub / f"sa_{n + 1}.jpg"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(image_path, "wb") as f:
            Image.fromarray(image).save(f, format="JPEG", quality=95)
        annotations = []
        for i, mask in enumerate(masks):
            ys, xs = np.nonzero(mask)
            annotations.append({
                "id": i, "segmentation": encode_mask(mask), "area": int(mask.sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                "predicted_iou": 0.9, "stability_score": 0.95, "crop_box": [0, 0, width, height],
                "point_coords": [[float(xs.mean()), float(ys.mean())]],
            })
        record = {"image": {"image_id": n + 1, "width": width, "height": height, "file_name": image_path.name},
                  "annotations": annotations}
        with atomic_open(image_path.with_suffix(".json"), "w", encoding="utf-8") as f:
            json.dump(record, f)
        written.append(image_path)
    return written
