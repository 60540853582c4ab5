"""Reading image and label files, with errors that name the file (no torch: commands that only read files start
fast)."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the problem."""


def files_fingerprint(paths: Iterable[Path], base: Path) -> str:
    """A cheap identity of a training set: each file's path relative to ``base`` and its size, in order (no contents
    read): a sample added, removed or replaced by one of another size changes it, the same files elsewhere do not."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        where = path.relative_to(base) if path.is_relative_to(base) else path
        digest.update(f"{where.as_posix()}|{path.stat().st_size}\n".encode())
    return digest.hexdigest()


#: PIL modes of single-channel images with more than 8 bits (16-bit grey PNG, TIFF): scaled to 8 bits, not clipped
WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: str | Path | IO[bytes], name: str | None = None, exif_orientation: bool = False) -> np.ndarray:
    """RGB uint8 ``[H,W,3]`` from a path or a binary file object (``name`` says what it is in errors); a corrupt or
    unreadable file raises :class:`DataError` naming it. A 16-bit grey image is scaled to 8 bits (PIL's RGB
    conversion clips it: almost white). ``exif_orientation``: turn the pixels as the EXIF orientation tag says (what
    a photo viewer shows; ``ovseg predict`` on a user's photos) — dataset readers leave that to their protocol."""
    name = name or str(path)
    try:
        with Image.open(path) as im:
            if exif_orientation:
                from PIL import ImageOps

                im = ImageOps.exif_transpose(im)
            if im.mode in WIDE_GREY_MODES:
                grey = np.asarray(im).astype(np.float64)
                scale = 257.0 if grey.max(initial=0) <= 65535 else grey.max() / 255.0  # 16 bits, or wider values
                grey = np.clip(np.round(grey / scale), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except Image.DecompressionBombError as e:  # PIL's guard against decompression bombs: a DataError like others
        raise DataError(f"{name}: image too large to read ({e}; PIL.Image.MAX_IMAGE_PIXELS sets the limit)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{name}: cannot decode image ({e})") from None


#: EXIF tag 274 (Orientation): 1 = as stored; 2-8 = mirror and/or rotate for display
EXIF_ORIENTATION = 0x0112


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation of an image file (1 when it has no tag or cannot say)."""
    try:
        with Image.open(path) as im:
            value = im.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, UnidentifiedImageError, SyntaxError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_exif_orientation(image, orientation: int):
    """An image ``[..., H, W]`` (tensor or array) as a viewer shows it: what PIL's ``ImageOps.exif_transpose``,
    cv2's ``imdecode(IMREAD_COLOR)`` (mmcv's reader) and detectron2's ``read_image`` do with tag ``orientation``."""
    import torch

    module = torch if isinstance(image, torch.Tensor) else np
    flip = (lambda x, *dims: torch.flip(x, dims)) if module is torch else (lambda x, *dims: np.flip(x, dims))
    swap = (lambda x: x.transpose(-2, -1)) if module is torch else (lambda x: np.swapaxes(x, -2, -1))
    rot90 = (lambda x, k: torch.rot90(x, k, (-2, -1))) if module is torch else (lambda x, k: np.rot90(x, k, (-2, -1)))
    transforms = {
        1: lambda x: x,
        2: lambda x: flip(x, -1),  # FLIP_LEFT_RIGHT
        3: lambda x: rot90(x, 2),  # ROTATE_180
        4: lambda x: flip(x, -2),  # FLIP_TOP_BOTTOM
        5: swap,  # TRANSPOSE
        6: lambda x: rot90(x, -1),  # ROTATE_270 (counter-clockwise)
        7: lambda x: rot90(swap(x), 2),  # TRANSVERSE
        8: lambda x: rot90(x, 1),  # ROTATE_90
    }
    if orientation not in transforms:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation!r}")
    return transforms[orientation](image)


def read_label_png(path: str | Path) -> np.ndarray:
    """Raw label values ``[H,W]``: palette indices for palette PNGs, values for grey PNGs."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"{path}: label PNG has mode {im.mode}; expected a palette or single-channel image")
            return np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: cannot decode label ({e})") from None
