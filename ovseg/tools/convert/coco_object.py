"""COCO-Object (background + 80 things) from COCO-Stuff's ``*_labelTrainIds.png``.

GroupViT's ``convert_dataset/convert_coco_object.py`` (copied as SCLIP's / NACLIP's
``datasets/cvt_coco_object.py``) takes mmseg's ``clsID_to_trID`` table, adds 1 to every train id and
then sets every raw id above 90 to 0. Its 255 entry is therefore 255 + 1 -> then 0 (255 > 90), so the
published COCO-Object labels give **unlabeled pixels the background class 0**, not 255. The default
here reproduces that (those are the labels behind the SCLIP-family COCO-Object numbers);
``unlabeled="ignore"`` keeps 255 instead. Starting from train ids instead of raw ids is equivalent:

- things, train ids 0..79 -> 1..80
- stuff, train ids 80..170 -> 0 (background)
- unlabeled 255 -> 0 (default, as GroupViT/SCLIP) or 255 (``--unlabeled ignore``)

Output: ``ROOT/annotations/{split}2017/<stem>_instanceTrainIds.png`` (grey PNG) next to the inputs.
"""

from __future__ import annotations

import argparse
from functools import partial
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
    unexpected_values,
)
from ovseg.data.label_maps import COCO_OBJECT_UNLABELED as UNLABELED
from ovseg.data.label_maps import coco_object_lut
from ovseg.tools.convert.coco_stuff import EXPECTED, NUM_CLASSES
from ovseg.utils.io import atomic_save_png

NAME = "coco_object"
SPLITS = ("train", "val")
IN_SUFFIX = "_labelTrainIds.png"
OUT_SUFFIX = "_instanceTrainIds.png"
_VALID = np.zeros(256, dtype=bool)
_VALID[:NUM_CLASSES] = True
_VALID[IGNORE] = True


def _convert_one(task: tuple[str, str], lut: np.ndarray) -> None:
    src, dst = task
    train_ids = read_index_png(src)
    bad = unexpected_values(train_ids, _VALID)
    if bad:
        raise ConversionError(
            f"{src}: values {bad[:10]} are not COCO-Stuff train ids (0..170, 255); "
            "is this a raw map rather than a *_labelTrainIds.png?"
        )
    atomic_save_png(dst, lut[train_ids])


def convert_coco_object(
    root: str | Path,
    splits: tuple[str, ...] = SPLITS,
    nproc: int = 1,
    overwrite: bool = False,
    unlabeled: str = "background",
) -> dict[str, Any]:
    """Write ``*_instanceTrainIds.png`` next to every ``*_labelTrainIds.png`` under ``ROOT/annotations``."""
    root = Path(root)
    lut = coco_object_lut(unlabeled)
    summary: dict[str, Any] = {}
    tasks: list[tuple[str, str]] = []
    for split in splits:
        ann_dir = require_dir(root / "annotations" / f"{split}2017", f"COCO-Stuff {split} annotations")
        files = sorted(ann_dir.glob(f"*{IN_SUFFIX}"))
        if not files:
            raise ConversionError(
                f"{ann_dir}: no *{IN_SUFFIX} files; run `ovseg data convert coco_stuff {root}` first"
            )
        tasks += [(str(p), str(p.with_name(p.name[: -len(IN_SUFFIX)] + OUT_SUFFIX))) for p in files]
        summary[split] = len(files)
    todo, skipped = split_todo(((t, Path(t[1])) for t in tasks), overwrite)
    results = run_parallel(partial(_convert_one, lut=lut), todo, nproc, desc=NAME)
    summary.update(written=len(results), skipped=skipped, unlabeled=unlabeled)
    return summary


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = convert_coco_object(args.root, tuple(args.splits), args.nproc, args.overwrite, args.unlabeled)
    print_summary(NAME, summary)
    print(f"  (official COCO-Stuff 164k: train={EXPECTED['train']}, val={EXPECTED['val']})")
    return summary


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="COCO-Object (background + 80 things) from COCO-Stuff *_labelTrainIds.png",
        description=(
            "Derive COCO-Object labels from COCO-Stuff train ids as GroupViT/SCLIP's cvt_coco_object does: "
            "things 0..79 -> 1..80, stuff 80..170 -> 0 (background), unlabeled 255 -> 0 (their converter's "
            "behaviour; --unlabeled ignore keeps 255). Writes *_instanceTrainIds.png next to the inputs under "
            "ROOT/annotations/{split}2017. Run the coco_stuff converter first."
        ),
    )
    p.add_argument("root", type=Path, help="the coco_stuff164k folder (holding annotations/{train,val}2017)")
    p.add_argument(
        "--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to convert (default: train val)"
    )
    p.add_argument(
        "--unlabeled",
        choices=UNLABELED,
        default="background",
        help="unlabeled (255) pixels: background 0 as in GroupViT/SCLIP's converter (default), or ignore (keep 255)",
    )
    add_common_args(p)
    p.set_defaults(func=main)
    return p
