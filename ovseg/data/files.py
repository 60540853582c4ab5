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


def read_image(path: str | Path | IO[bytes], name: str | None = None) -> np.ndarray:
    """RGB uint8 ``[H,W,3]`` from a path or a binary file object (``name`` says what it is in errors); a corrupt or
    unreadable file raises :class:`DataError` naming it."""
    name = name or str(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except Image.DecompressionBombError as e:  # PIL's guard against decompression bombs: a DataError like others
        raise DataError(f"{name}: image too large to read ({e}; PIL.Image.MAX_IMAGE_PIXELS sets the limit)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{name}: cannot decode image ({e})") from None


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
