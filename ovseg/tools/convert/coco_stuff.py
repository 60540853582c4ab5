"""COCO-Stuff 164k: raw ``stuffthingmaps`` (ids 0..181, 255 unlabeled) -> ``*_labelTrainIds.png`` (0..170).

The mapping is mmsegmentation's ``clsID_to_trID`` (``tools/dataset_converters/coco_stuff164k.py``): the
182 raw ids are COCO category ids minus one; 11 of them were never used (COCO's 91 thing ids hold only
80 classes), and the 171 used ids, in order, become train ids 0..170 -- 0..79 the 80 things, 80..170 the
91 stuff classes. 255 stays 255. mmseg leaves any other value unchanged; no such value occurs in the
official maps, and here it becomes 255 with a warning naming the file.

Input: ``SRC/{train,val}2017/*.png`` (``stuffthingmaps_trainval2017`` unpacked; by default
``ROOT/annotations``, where mmseg's instructions unpack it). Output:
``ROOT/annotations/{split}2017/<stem>_labelTrainIds.png`` (grey PNG, as mmseg writes them).
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
from ovseg.data.label_maps import COCO_NUM_THINGS
from ovseg.utils.io import atomic_save_png

NAME = "coco_stuff"
SPLITS = ("train", "val")
EXPECTED = {"train": 118287, "val": 5000}
NUM_RAW = 182
#: raw ids (COCO category id - 1) that no class uses: COCO thing ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91.
UNUSED_RAW_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
#: used raw ids in order; ``USED_RAW_IDS[t]`` is the raw id of train id ``t``.
USED_RAW_IDS = tuple(i for i in range(NUM_RAW) if i not in UNUSED_RAW_IDS)
NUM_CLASSES = len(USED_RAW_IDS)  # 171
NUM_THINGS = COCO_NUM_THINGS
#: mmseg's ``clsID_to_trID``.
RAW_TO_TRAIN: dict[int, int] = {**{raw: t for t, raw in enumerate(USED_RAW_IDS)}, IGNORE: IGNORE}
assert NUM_CLASSES == 171 and USED_RAW_IDS[NUM_THINGS - 1] == 89 and USED_RAW_IDS[NUM_THINGS] == 91

LUT = np.full(256, IGNORE, dtype=np.uint8)
for _raw, _train in RAW_TO_TRAIN.items():
    LUT[_raw] = _train
_KNOWN = np.zeros(256, dtype=bool)
_KNOWN[list(RAW_TO_TRAIN)] = True

OUT_SUFFIX = "_labelTrainIds.png"


def raw_to_train_ids(raw: np.ndarray) -> np.ndarray:
    """Raw stuffthingmaps values -> train ids 0..170 (uint8; 255 unlabeled and unknown values)."""
    return LUT[np.asarray(raw, dtype=np.uint8)]


def _convert_one(task: tuple[str, str]) -> tuple[str, list[int]]:
    src, dst = task
    raw = read_index_png(src)
    atomic_save_png(dst, raw_to_train_ids(raw))
    return src, unexpected_values(raw, _KNOWN)


def raw_maps(src_dir: Path) -> list[Path]:
    """The raw stuffthingmaps PNGs of a folder (converted ``*TrainIds.png`` next to them are left out)."""
    return sorted(p for p in src_dir.glob("*.png") if "TrainIds" not in p.name)


def convert_coco_stuff(
    root: str | Path,
    src: str | Path | None = None,
    splits: tuple[str, ...] = SPLITS,
    nproc: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``ROOT/annotations/{split}2017/*_labelTrainIds.png`` from the raw maps under ``src``."""
    root = Path(root)
    src = Path(src) if src is not None else root / "annotations"
    summary: dict[str, Any] = {}
    tasks: list[tuple[str, str]] = []
    for split in splits:
        src_dir = require_dir(src / f"{split}2017", f"COCO-Stuff raw {split} maps")
        files = raw_maps(src_dir)
        if not files:
            raise ConversionError(f"{src_dir}: no raw stuffthingmaps PNGs (from stuffthingmaps_trainval2017.zip)")
        out_dir = root / "annotations" / f"{split}2017"
        tasks += [(str(p), str(out_dir / f"{p.name.split('.')[0]}{OUT_SUFFIX}")) for p in files]
        summary[split] = len(files)
    todo, skipped = split_todo(((t, Path(t[1])) for t in tasks), overwrite)
    results = run_parallel(_convert_one, todo, nproc, desc=NAME)
    unknown = warn_unknown_values(
        results,
        (
            "raw maps hold values that are neither a used COCO-Stuff id (0..181 without "
            f"{list(UNUSED_RAW_IDS)}) nor 255"
        ),
    )
    summary.update(written=len(results), skipped=skipped, files_with_unknown_ids=unknown)
    return summary


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = convert_coco_stuff(args.root, args.src, tuple(args.splits), args.nproc, args.overwrite)
    print_summary(NAME, summary)
    print(f"  (official COCO-Stuff 164k: train={EXPECTED['train']}, val={EXPECTED['val']})")
    return summary


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="COCO-Stuff 164k raw stuffthingmaps -> *_labelTrainIds.png (171 classes)",
        description=(
            "Map raw COCO-Stuff stuffthingmaps (values 0..181, 255 unlabeled) to the 171 train ids of "
            "mmsegmentation's coco_stuff164k.py (11 unused raw ids dropped, order kept; 255 and unknown values "
            "-> 255) and write ROOT/annotations/{split}2017/<stem>_labelTrainIds.png."
        ),
    )
    p.add_argument("root", type=Path, help="the coco_stuff164k folder (holding images/ and annotations/)")
    p.add_argument(
        "--src",
        type=Path,
        default=None,
        help="folder holding the raw {train,val}2017/*.png, e.g. stuffthingmaps_trainval2017 "
        "(default: ROOT/annotations)",
    )
    p.add_argument(
        "--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to convert (default: train val)"
    )
    add_common_args(p)
    p.set_defaults(func=main)
    return p
