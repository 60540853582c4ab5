"""Shared pieces of the dataset converters: errors, label reading, lookup tables, parallel runs."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")

IGNORE = 255


class ConversionError(ValueError):
    """An input of a converter is missing or malformed; the message names the file and the problem."""


class ConversionWarning(UserWarning):
    """Something in the input looks unusual but the conversion can go on."""


def warn(message: str) -> None:
    warnings.warn(message, ConversionWarning, stacklevel=2)


def read_index_png(path: str | Path) -> np.ndarray:
    """A label PNG as uint8 ``[H,W]``: palette indices for palette PNGs, values for grey PNGs."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ConversionError(
                    f"{path}: label PNG has mode {im.mode}; expected an 8-bit palette or grey image"
                )
            return np.array(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ConversionError(f"{path}: cannot decode PNG ({e})") from None


def make_lut(mapping: dict[int, int], default: int = IGNORE) -> np.ndarray:
    """A 256-entry uint8 lookup table: ``lut[raw] = mapping.get(raw, default)``."""
    lut = np.full(256, default, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


def unexpected_values(label: np.ndarray, allowed: np.ndarray) -> list[int]:
    """Sorted values of ``label`` (uint8) whose entry in the boolean table ``allowed`` (256,) is False."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    return [int(v) for v in present if not allowed[v]]


def run_parallel(
    func: Callable[[T], R], tasks: Sequence[T], nproc: int = 1, desc: str = "", unit: str = "file"
) -> list[R]:
    """``[func(t) for t in tasks]`` (in completion order) on ``nproc`` processes, with a progress bar.

    The bar is hidden when stderr is not a terminal. An exception in a worker is raised here.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    bar = dict(total=len(tasks), desc=desc, unit=unit, disable=None, file=sys.stderr, dynamic_ncols=True)
    if nproc == 1 or len(tasks) <= 1:
        return [func(t) for t in tqdm(tasks, **bar)]
    chunksize = max(1, min(64, len(tasks) // (nproc * 8)))
    with Pool(min(nproc, len(tasks))) as pool:
        return list(tqdm(pool.imap_unordered(func, tasks, chunksize=chunksize), **bar))


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="worker processes (default: 1)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite outputs that already exist (default: skip them, so an interrupted run resumes)",
    )


def print_summary(name: str, summary: dict[str, Any]) -> None:
    print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


def warn_unknown_values(results: Iterable[tuple[str, list[int]]], what: str) -> int:
    """Warn once about output files whose inputs held values outside the mapping (``what`` says which
    values, e.g. "values outside the Cityscapes label ids 0..33"); returns how many files did."""
    odd = sorted((path, values) for path, values in results if values)
    if odd:
        warn(f"{len(odd)} {what}; written as 255. E.g. " + "; ".join(f"{p}: {v[:5]}" for p, v in odd[:3]))
    return len(odd)


def split_todo(outputs: Iterable[tuple[T, Path]], overwrite: bool) -> tuple[list[T], int]:
    """Tasks whose output must be (re)written, and the number skipped because it already exists."""
    todo, skipped = [], 0
    for task, out in outputs:
        if not overwrite and out.is_file():
            skipped += 1
        else:
            todo.append(task)
    return todo, skipped


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ConversionError(f"{path}: {what} folder not found")
    return path


def read_id_list(path: Path, what: str) -> list[str]:
    """A split file: one file id per line (blank lines ignored)."""
    if not path.is_file():
        raise ConversionError(f"{path}: {what} list not found")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def list_text(ids: Iterable[str]) -> str:
    return "".join(f"{i}\n" for i in ids)
