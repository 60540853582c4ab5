"""Pascal Context-459 labels from the full annotations (``trainval.tar.gz``: one ``<id>.mat`` per image, ``LabelMap``
1..459 as in its ``labels.txt``), as CAT-Seg's ``datasets/prepare_pascal_context_459.py``.

Their script: for each id of the validation list (``VOC2010/pascalcontext_val.txt``, 5,104 ids, the same set as
``ImageSets/SegmentationContext/val.txt``) whose ``VOC2010/trainval/<id>.mat`` exists (others are skipped), write
``LabelMap - 1`` as a TIFF. ``LabelMap`` is uint16, so a 0 (none in the official files) wraps to 65535; here that is
explicit. Values above 460 (no class in labels.txt) are an error naming the file. ``register_pascal_context.py`` then
scores every TIFF with ``ignore_label=459`` (see the ``pc459`` spec in :mod:`ovseg.data.specs`).

Output: ``VOC2010/annotations_detectron2/pc459_val/<id>.tif`` (uint16 TIFF) under the VOCdevkit folder.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ovseg.data.specs import WIDE_IGNORE_INDEX
from ovseg.tools.convert._common import (
    ConversionError,
    add_common_args,
    print_summary,
    read_id_list,
    run_parallel,
    split_todo,
    warn,
)
from ovseg.utils.io import atomic_save_tiff

NAME = "pc459"
#: labels.txt numbers the classes 1..459; ``LabelMap - 1`` = 459 is CAT-Seg's ignore label
MAX_LABEL = 460


def label_from_labelmap(label_map: np.ndarray, where: str = "LabelMap") -> np.ndarray:
    """``LabelMap`` (1..459) -> ``LabelMap - 1`` as uint16, 0 -> 65535 (uint16 wrap-around, as theirs)."""
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ConversionError(f"{where}: LabelMap has dtype {label_map.dtype}, expected integers (uint16)")
    values = label_map.astype(np.int64)
    too_large = np.unique(values[values > MAX_LABEL])
    if too_large.size or values.min(initial=0) < 0:
        bad = too_large.tolist()[:10] or np.unique(values[values < 0]).tolist()[:10]
        raise ConversionError(f"{where}: LabelMap values {bad} outside 0..{MAX_LABEL} (labels.txt has 459 classes)")
    return np.where(values == 0, WIDE_IGNORE_INDEX, values - 1).astype(np.uint16)


def read_labelmap(path: Path) -> np.ndarray:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path)
    except FileNotFoundError:
        raise ConversionError(f"{path}: .mat file not found") from None
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError) as e:
        raise ConversionError(f"{path}: cannot read the .mat file ({e})") from None
    if "LabelMap" not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise ConversionError(f"{path}: no 'LabelMap' in the .mat file (variables: {keys})")
    label_map = np.asarray(mat["LabelMap"])
    if label_map.ndim != 2:
        raise ConversionError(f"{path}: LabelMap has shape {label_map.shape}, expected a 2-D map")
    return label_map


def _convert_one(file_id: str, mat_dir: str, out_dir: str) -> str:
    path = Path(mat_dir) / f"{file_id}.mat"
    atomic_save_tiff(Path(out_dir) / f"{file_id}.tif", label_from_labelmap(read_labelmap(path), str(path)))
    return file_id


def convert_pc459(devkit: str | Path, ids: str | Path | None = None, mat_dir: str | Path | None = None,
                  nproc: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Write PC-459 validation labels under ``devkit`` (the ``VOCdevkit`` folder); see the module docstring.

    ``ids``: the validation list (default: CAT-Seg's ``VOC2010/pascalcontext_val.txt``, else mmseg's
    ``VOC2010/ImageSets/SegmentationContext/val.txt``); ``mat_dir``: the unpacked ``trainval`` folder (default
    ``VOC2010/trainval``)."""
    voc = Path(devkit) / "VOC2010"
    if ids is None:
        candidates = [voc / "pascalcontext_val.txt", voc / "ImageSets" / "SegmentationContext" / "val.txt"]
        ids = next((c for c in candidates if c.is_file()), candidates[0])
    file_ids = read_id_list(Path(ids), "validation id")
    mat_dir = Path(mat_dir) if mat_dir is not None else voc / "trainval"
    if not mat_dir.is_dir():
        raise ConversionError(f"{mat_dir}: folder of the 459-class .mat files not found (unpack trainval.tar.gz)")
    missing = [i for i in file_ids if not (mat_dir / f"{i}.mat").is_file()]
    if missing:  # their script skips these; the split is then incomplete (`ovseg data verify` counts it)
        warn(f"{len(missing)} id(s) of {ids} have no .mat in {mat_dir} and are skipped, e.g. {missing[:3]}")
    out_dir = voc / "annotations_detectron2" / "pc459_val"  # the pc459 spec's ann_dir, under this VOCdevkit
    present = [i for i in file_ids if i not in set(missing)]
    todo, skipped = split_todo(((i, out_dir / f"{i}.tif") for i in present), overwrite)
    written = run_parallel(partial(_convert_one, mat_dir=str(mat_dir), out_dir=str(out_dir)), todo, nproc,
                           desc=NAME, unit="img")
    return {"val": len(file_ids), "written": len(written), "skipped": skipped, "missing": len(missing)}


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = convert_pc459(args.devkit, args.ids, args.mat_dir, args.nproc, args.overwrite)
    print_summary(NAME, summary)
    print("  (official trainval.tar.gz: val=5104)")
    return summary


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="Pascal Context-459 labels (16-bit) from the full trainval .mat files, as CAT-Seg's script",
        description=(
            "Write LabelMap - 1 of each validation id's VOC2010/trainval/<id>.mat (the unpacked trainval.tar.gz) as "
            "DEVKIT/VOC2010/annotations_detectron2/pc459_val/<id>.tif (uint16; 0 -> 65535), as CAT-Seg's "
            "prepare_pascal_context_459.py. The images are VOC2010's JPEGImages."
        ),
    )
    p.add_argument("devkit", type=Path, help="the VOCdevkit folder (holding VOC2010/JPEGImages)")
    p.add_argument("--ids", type=Path, default=None,
                   help="validation id list (default: VOC2010/pascalcontext_val.txt from CAT-Seg's datasets/, else "
                        "VOC2010/ImageSets/SegmentationContext/val.txt from `ovseg data convert pascal_context`)")
    p.add_argument("--mat-dir", type=Path, default=None, help="the .mat folder (default: DEVKIT/VOC2010/trainval)")
    add_common_args(p)
    p.set_defaults(func=main)
    return p
