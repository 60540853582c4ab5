"""Cityscapes: ``gtFine/{split}/<city>/*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` (19 classes).

mmseg's converter calls cityscapesscripts' ``json2labelImg(..., 'trainIds')`` on the polygon JSONs. The
``gtFine_trainvaltest.zip`` download already holds the ``*_labelIds.png`` rendered from the same polygons
(by the same polygon-drawing script), so mapping them through the official label table gives the same PNGs
without the cityscapesscripts dependency. The table below is cityscapesscripts' ``helpers/labels.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ovseg.tools.convert._common import (
    IGNORE,
    ConversionError,
    add_common_args,
    print_summary,
    read_index_png,
    require_dir,
    run_parallel,
    split_todo,
    warn_unknown_values,
    unexpected_values,
)
from ovseg.utils.io import atomic_save_png

NAME = "cityscapes"
SPLITS = ("train", "val", "test")
EXPECTED = {"train": 2975, "val": 500, "test": 1525}
IN_SUFFIX = "_gtFine_labelIds.png"
OUT_SUFFIX = "_gtFine_labelTrainIds.png"
POLYGON_SUFFIX = "_gtFine_polygons.json"

#: (label id, name, train id) of cityscapesscripts' label table; 255 = ignored in training/evaluation.
#: ("license plate", id -1, is never written into labelIds PNGs and is left out.)
LABELS: tuple[tuple[int, str, int], ...] = (
    (0, "unlabeled", 255),
    (1, "ego vehicle", 255),
    (2, "rectification border", 255),
    (3, "out of roi", 255),
    (4, "static", 255),
    (5, "dynamic", 255),
    (6, "ground", 255),
    (7, "road", 0),
    (8, "sidewalk", 1),
    (9, "parking", 255),
    (10, "rail track", 255),
    (11, "building", 2),
    (12, "wall", 3),
    (13, "fence", 4),
    (14, "guard rail", 255),
    (15, "bridge", 255),
    (16, "tunnel", 255),
    (17, "pole", 5),
    (18, "polegroup", 255),
    (19, "traffic light", 6),
    (20, "traffic sign", 7),
    (21, "vegetation", 8),
    (22, "terrain", 9),
    (23, "sky", 10),
    (24, "person", 11),
    (25, "rider", 12),
    (26, "car", 13),
    (27, "truck", 14),
    (28, "bus", 15),
    (29, "caravan", 255),
    (30, "trailer", 255),
    (31, "train", 16),
    (32, "motorcycle", 17),
    (33, "bicycle", 18),
)
LABEL_TO_TRAIN: dict[int, int] = {label_id: train_id for label_id, _, train_id in LABELS}
NUM_CLASSES = 19
LUT = np.full(256, IGNORE, dtype=np.uint8)
for _id, _train in LABEL_TO_TRAIN.items():
    LUT[_id] = _train
_KNOWN = np.zeros(256, dtype=bool)
_KNOWN[list(LABEL_TO_TRAIN)] = True


def label_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes label ids -> train ids 0..18 (uint8; 255 for ignored and unknown ids)."""
    return LUT[np.asarray(label_ids, dtype=np.uint8)]


def _convert_one(task: tuple[str, str]) -> tuple[str, list[int]]:
    src, dst = task
    label_ids = read_index_png(src)
    atomic_save_png(dst, label_to_train_ids(label_ids))
    return src, unexpected_values(label_ids, _KNOWN)


def _gtfine_root(root: Path) -> Path:
    for candidate in (root / "gtFine", root / "cityscapes" / "gtFine"):
        if candidate.is_dir():
            return candidate
    raise ConversionError(f"{root}: no gtFine folder (expected ROOT/gtFine/{{train,val}}/<city>/*{IN_SUFFIX})")


def convert_cityscapes(
    root: str | Path, splits: tuple[str, ...] = ("train", "val"), nproc: int = 1, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``*_gtFine_labelTrainIds.png`` next to every ``*_gtFine_labelIds.png`` of the splits."""
    gtfine = _gtfine_root(Path(root))
    summary: dict[str, Any] = {}
    tasks: list[tuple[str, str]] = []
    for split in splits:
        split_dir = require_dir(gtfine / split, f"Cityscapes gtFine/{split}")
        files = sorted(split_dir.glob(f"*/*{IN_SUFFIX}"))
        unrendered = sorted(
            p
            for p in split_dir.glob(f"*/*{POLYGON_SUFFIX}")
            if not p.with_name(p.name[: -len(POLYGON_SUFFIX)] + IN_SUFFIX).is_file()
        )
        if unrendered:
            raise ConversionError(
                f"{split_dir}: {len(unrendered)} polygon files have no *{IN_SUFFIX} next to them, e.g. "
                f"{unrendered[0]}. Render them first with cityscapesscripts "
                "(`pip install cityscapesscripts`, then `CITYSCAPES_DATASET=<root> csCreateTrainIdLabelImgs`, "
                "i.e. json2labelImg(..., 'trainIds'), which writes the *_labelTrainIds.png directly), or unpack "
                "the complete gtFine_trainvaltest.zip"
            )
        if not files:
            raise ConversionError(f"{split_dir}: no <city>/*{IN_SUFFIX} files")
        tasks += [(str(p), str(p.with_name(p.name[: -len(IN_SUFFIX)] + OUT_SUFFIX))) for p in files]
        summary[split] = len(files)
    todo, skipped = split_todo(((t, Path(t[1])) for t in tasks), overwrite)
    results = run_parallel(_convert_one, todo, nproc, desc=NAME)
    unknown = warn_unknown_values(
        results,
        "labelIds PNGs hold values outside the Cityscapes label ids 0..33",
    )
    summary.update(written=len(results), skipped=skipped, files_with_unknown_ids=unknown)
    return summary


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = convert_cityscapes(args.root, tuple(args.splits), args.nproc, args.overwrite)
    print_summary(NAME, summary)
    print(f"  (official gtFine: train={EXPECTED['train']}, val={EXPECTED['val']}, test={EXPECTED['test']})")
    return summary


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="Cityscapes *_gtFine_labelIds.png -> *_gtFine_labelTrainIds.png (19 classes)",
        description=(
            "Map Cityscapes label ids to the 19 train ids of the official label table (others -> 255) and write "
            "*_gtFine_labelTrainIds.png next to each ROOT/gtFine/{split}/<city>/*_gtFine_labelIds.png. "
            "No cityscapesscripts needed when the labelIds PNGs are present."
        ),
    )
    p.add_argument("root", type=Path, help="the cityscapes folder (holding gtFine/ and leftImg8bit/)")
    p.add_argument(
        "--splits", nargs="+", default=["train", "val"], choices=SPLITS, help="splits to convert (default: train val)"
    )
    add_common_args(p)
    p.set_defaults(func=main)
    return p
