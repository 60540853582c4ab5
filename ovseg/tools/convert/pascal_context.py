"""Pascal Context (PC-59/60) labels from PASCAL-in-Detail's ``trainval_merged.json``, with pycocotools only.

Re-implements mmsegmentation's ``tools/dataset_converters/pascal_context.py`` without the detail-api
(``pip install detail`` installs an unrelated project). detail-api's ``Detail.getMask(img)`` starts from
zeros of the image size, decodes every ``annos_segmentation`` RLE of the image in JSON order with COCO mask
utils and paints its ``category_id`` (later annotations win); mmseg then maps the 60 kept raw ids to 0..59.
Both steps are reproduced here, so the PNGs are the ones behind everyone's PC-59/60 numbers.

Output (under the VOCdevkit root):
``VOC2010/SegmentationClassContext/<file_id>.png`` (palette PNG, 0 = background, 1..59 = classes) and
``VOC2010/ImageSets/SegmentationContext/{train,val}.txt`` (4,996 / 5,104 ids with the official JSON).
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ovseg.data.classnames import read_class_names
from ovseg.data.specs import voc_palette
from ovseg.tools.convert._common import (
    ConversionError,
    add_common_args,
    list_text,
    print_summary,
    run_parallel,
    split_todo,
    warn,
)
from ovseg.utils.io import atomic_save_png, atomic_write_text

NAME = "pascal_context"
SPLITS = ("train", "val")

#: the 60 raw Detail category ids kept by PC-60, exactly as listed in mmseg's converter (0 = background).
KEPT_RAW_IDS = (
    0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284,
    158, 159, 416, 33, 162, 420, 454, 295, 296, 427, 44, 45, 46, 308, 59,
    440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355,
    85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115,
)  # fmt: skip
#: sorted: raw id ``SORTED_RAW_IDS[i]`` becomes label ``i`` (mmseg: ``np.digitize(mask, sorted, right=True)``).
SORTED_RAW_IDS = np.sort(np.array(KEPT_RAW_IDS, dtype=np.int64))

#: PASCAL-Context (459-class ``labels.txt``) names of the 59 kept ids, in sorted-id order. Sorted by raw id
#: they are alphabetical, which is why ``classnames/context59.txt`` is alphabetical.
DETAIL_NAMES: dict[int, str] = {
    2: "aeroplane", 9: "bag", 18: "bed", 19: "bedclothes", 22: "bench", 23: "bicycle", 25: "bird",
    31: "boat", 33: "book", 34: "bottle", 44: "building", 45: "bus", 46: "cabinet", 59: "car", 65: "cat",
    68: "ceiling", 72: "chair", 80: "cloth", 85: "computer", 98: "cow", 104: "cup", 105: "curtain",
    113: "dog", 115: "door", 144: "fence", 158: "floor", 159: "flower", 162: "food", 187: "grass",
    189: "ground", 207: "horse", 220: "keyboard", 232: "light", 258: "motorbike", 259: "mountain",
    260: "mouse", 284: "person", 295: "plate", 296: "platform", 308: "pottedplant", 324: "road",
    326: "rock", 347: "sheep", 349: "shelves", 354: "sidewalk", 355: "sign", 360: "sky", 366: "snow",
    368: "sofa", 397: "table", 415: "track", 416: "train", 420: "tree", 424: "truck", 427: "tvmonitor",
    440: "wall", 445: "water", 454: "window", 458: "wood",
}  # fmt: skip
_ALIASES = {"diningtable": "table", "airplane": "aeroplane", "motorcycle": "motorbike", "tv": "tvmonitor"}


def map_raw_ids(raw: np.ndarray, unlisted: str = "background") -> tuple[np.ndarray, list[int]]:
    """Raw Detail category ids -> PC-60 labels 0..59 (uint8), and the sorted raw ids that were not kept.

    Kept ids map exactly as mmseg's ``_class_to_index``: ``SORTED_RAW_IDS[i] -> i``.

    Unlisted ids (not among the 60): mmseg's converter first *asserts* that every value is kept, so it
    never maps one; were the assertion removed, ``np.digitize(..., right=True)`` would send an unlisted
    id to the index of the next larger kept id (raw 1 -> 1 "aeroplane", raw 3 -> 2 "bag"; ids above 458
    -> index 60, an IndexError) -- a silent mislabelling, not a rule. Here ``unlisted="background"``
    maps them to 0 (PC-60's definition: every class outside the 59 is background) and reports them;
    ``unlisted="error"`` fails like mmseg. On any JSON mmseg accepts (the official
    ``trainval_merged.json`` only holds kept ids) both give mmseg's PNGs bit for bit.
    """
    raw = np.asarray(raw).astype(np.int64, copy=False)
    pos = np.minimum(np.searchsorted(SORTED_RAW_IDS, raw), len(SORTED_RAW_IDS) - 1)
    kept = SORTED_RAW_IDS[pos] == raw
    label = np.where(kept, pos, 0).astype(np.uint8)
    others = sorted(int(v) for v in np.unique(raw[~kept])) if not kept.all() else []
    if others and unlisted == "error":
        raise ConversionError(f"raw category ids {others} are not among the 60 kept Pascal Context ids")
    return label, others


def _norm(name: str) -> str:
    name = re.sub(r"[^a-z0-9]", "", name.lower())
    return _ALIASES.get(name, name)


def check_category_names(categories: dict[int, str] | None = None) -> list[str]:
    """Disagreements between our ``context59`` class order and the Detail names of the sorted kept ids.

    ``categories`` is the JSON's ``{category_id: name}``; ``None`` checks the built-in table only.
    """
    ours = [synonyms[0] for synonyms in read_class_names("context59")]
    kept = [int(i) for i in SORTED_RAW_IDS[1:]]
    problems = []
    if len(ours) != len(kept):
        problems.append(f"context59 has {len(ours)} classes, expected {len(kept)}")
    for label, (raw, our_name) in enumerate(zip(kept, ours), start=1):
        for source, names in (("built-in table", DETAIL_NAMES), ("JSON categories", categories)):
            if names is None:
                continue
            if raw not in names:
                if names is DETAIL_NAMES:  # a JSON may list only some categories: compare those it has
                    problems.append(f"label {label}: raw id {raw} missing from the {source}")
            elif _norm(names[raw]) != _norm(our_name):
                problems.append(
                    f"label {label}: raw id {raw} is {names[raw]!r} in the {source}, context59 says {our_name!r}"
                )
    return problems


def _fail(json_path: Path, what: str) -> ConversionError:
    return ConversionError(f"{json_path}: {what}")


def _decode_rle(segmentation: dict[str, Any]) -> np.ndarray:
    h, w = segmentation["size"]
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        counts = segmentation["counts"]
        rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools' Cython RLEs trip a NumPy 2 DeprecationWarning on __array__
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def _render(task: dict[str, Any], json_path: str, out_dir: str, unlisted: str) -> tuple[str, list[int]]:
    """Paint one image's annotations, map them to 0..59 and write the PNG."""
    raw = np.zeros((task["height"], task["width"]), dtype=np.int64)
    for ann_ref, category_id, segmentation in task["anns"]:
        try:
            m = _decode_rle(segmentation)
        except Exception as e:  # pycocotools raises bare Exceptions / TypeErrors on bad counts
            raise _fail(Path(json_path), f"{ann_ref} (image {task['file_name']}): cannot decode RLE ({e})") from None
        if m.shape != raw.shape:
            raise _fail(Path(json_path), f"{ann_ref}: RLE decodes to {m.shape}, image is {raw.shape}")
        raw[m.astype(bool)] = category_id
    try:
        label, others = map_raw_ids(raw, unlisted)
    except ConversionError as e:
        raise _fail(Path(json_path), f"image {task['file_name']}: {e}") from None
    atomic_save_png(Path(out_dir) / f"{task['file_id']}.png", label, palette=voc_palette())
    return task["file_id"], others


def load_detail_json(json_path: Path, splits: tuple[str, ...] = SPLITS) -> tuple[list[dict], dict[int, str]]:
    """Per-image tasks (``file_id``, ``file_name``, ``phase``, ``height``, ``width``, ``anns``) and categories.

    Every structural problem raises :class:`ConversionError` naming the JSON and the offending entry.
    """
    if not json_path.is_file():
        raise ConversionError(
            f"{json_path}: annotation JSON not found (expected PASCAL-in-Detail trainval_merged.json)"
        )
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(json_path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _fail(json_path, f"top level is a {type(data).__name__}, expected an object")
    for key in ("images", "annos_segmentation"):
        if not isinstance(data.get(key), list):
            raise _fail(
                json_path,
                f"missing list {key!r} (keys: {', '.join(sorted(data)) or 'none'}); "
                "expected the PASCAL-in-Detail trainval_merged.json",
            )

    categories: dict[int, str] = {}
    for cat in data.get("categories") or []:
        if isinstance(cat, dict) and "category_id" in cat and "name" in cat:
            categories[int(cat["category_id"])] = str(cat["name"])

    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        keys = ("image_id", "file_name", "phase", "height", "width")
        missing = [k for k in keys if not isinstance(img, dict) or k not in img]
        if missing:
            raise _fail(json_path, f"images[{i}] lacks {', '.join(missing)}")
        if img["image_id"] in images:
            raise _fail(json_path, f"images[{i}]: duplicate image_id {img['image_id']}")
        images[img["image_id"]] = {
            "file_id": Path(str(img["file_name"])).stem,
            "file_name": str(img["file_name"]),
            "phase": img["phase"],
            "height": int(img["height"]),
            "width": int(img["width"]),
            "anns": [],
        }

    for i, ann in enumerate(data["annos_segmentation"]):
        ref = f"annos_segmentation[{i}]" + (f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
        missing = [k for k in ("image_id", "category_id", "segmentation") if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise _fail(json_path, f"{ref} lacks {', '.join(missing)}")
        img = images.get(ann["image_id"])
        if img is None:
            raise _fail(json_path, f"{ref}: image_id {ann['image_id']} is not in 'images'")
        seg = ann["segmentation"]
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise _fail(json_path, f"{ref}: segmentation is not a COCO RLE with 'size' and 'counts'")
        if list(seg["size"]) != [img["height"], img["width"]]:
            raise _fail(
                json_path,
                f"{ref}: RLE size {list(seg['size'])} differs from image {img['file_name']} "
                f"(height, width) = [{img['height']}, {img['width']}]",
            )
        if not isinstance(seg["counts"], (str, bytes, list)):
            kind = type(seg["counts"]).__name__
            raise _fail(json_path, f"{ref}: RLE counts is a {kind}, expected a string or a list")
        category_id = ann["category_id"]
        if not isinstance(category_id, int) or category_id < 0:
            raise _fail(json_path, f"{ref}: category_id {category_id!r} is not a non-negative integer")
        img["anns"].append((ref, category_id, seg))

    tasks = [img for img in images.values() if img["phase"] in splits]
    return tasks, categories


def convert_pascal_context(
    devkit: str | Path,
    json_path: str | Path | None = None,
    splits: tuple[str, ...] = SPLITS,
    nproc: int = 1,
    overwrite: bool = False,
    unlisted: str = "background",
) -> dict[str, Any]:
    """Write PC-60 label PNGs and split files under ``devkit`` (the ``VOCdevkit`` folder)."""
    devkit = Path(devkit)
    json_path = Path(json_path) if json_path is not None else devkit / "VOC2010" / "trainval_merged.json"
    if unlisted not in ("background", "error"):
        raise ValueError(f"unlisted must be 'background' or 'error', got {unlisted!r}")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split(s) {bad}; Pascal Context has {list(SPLITS)}")

    tasks, categories = load_detail_json(json_path, tuple(splits))
    problems = check_category_names(categories if categories else None)
    for problem in problems:
        warn(f"{json_path}: class order check: {problem}")
    if not (devkit / "VOC2010" / "JPEGImages").is_dir():
        warn(f"{devkit / 'VOC2010' / 'JPEGImages'} not found: labels are written, but the images are needed too")

    by_id: dict[str, dict] = {}
    for t in tasks:
        if t["file_id"] in by_id:
            raise ConversionError(f"{json_path}: two images share the file id {t['file_id']!r}")
        by_id[t["file_id"]] = t

    out_dir = devkit / "VOC2010" / "SegmentationClassContext"
    todo, skipped = split_todo(((t, out_dir / f"{t['file_id']}.png") for t in tasks), overwrite)
    results = run_parallel(
        partial(_render, json_path=str(json_path), out_dir=str(out_dir), unlisted=unlisted),
        todo,
        nproc,
        desc="pascal_context",
        unit="img",
    )

    unlisted_ids: dict[int, int] = defaultdict(int)  # raw id -> number of images holding it
    for _, others in results:
        for v in others:
            unlisted_ids[v] += 1
    if unlisted_ids:
        warn(
            f"{json_path}: raw category ids outside the 60 kept ones were mapped to background (0): "
            + ", ".join(f"{k} ({n} images)" for k, n in sorted(unlisted_ids.items()))
        )

    list_dir = devkit / "VOC2010" / "ImageSets" / "SegmentationContext"
    summary: dict[str, Any] = {}
    for split in splits:
        ids = sorted(t["file_id"] for t in tasks if t["phase"] == split)
        atomic_write_text(list_dir / f"{split}.txt", list_text(ids))
        summary[split] = len(ids)
    summary.update(written=len(results), skipped=skipped, unlisted_ids=len(unlisted_ids), name_mismatches=len(problems))
    return summary


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = convert_pascal_context(
        args.devkit, args.json, tuple(args.splits), args.nproc, args.overwrite, args.unlisted
    )
    print_summary(NAME, summary)
    print("  (official trainval_merged.json: train=4996, val=5104)")
    return summary


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="Pascal Context 59/60 labels from trainval_merged.json (pycocotools only)",
        description=(
            "Decode the PASCAL-in-Detail annotations of trainval_merged.json with pycocotools, map the 60 kept "
            "category ids to 0..59 exactly as mmsegmentation's pascal_context.py, and write "
            "VOC2010/SegmentationClassContext/*.png and VOC2010/ImageSets/SegmentationContext/{train,val}.txt "
            "under DEVKIT. Does not need the detail-api (the PyPI package 'detail' is unrelated)."
        ),
    )
    p.add_argument("devkit", type=Path, help="the VOCdevkit folder (holding VOC2010/JPEGImages)")
    p.add_argument(
        "json",
        type=Path,
        nargs="?",
        default=None,
        help="path to trainval_merged.json (default: DEVKIT/VOC2010/trainval_merged.json)",
    )
    p.add_argument(
        "--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="phases to convert (default: train val)"
    )
    p.add_argument(
        "--unlisted",
        choices=("background", "error"),
        default="background",
        help="raw category ids outside the 60 kept ones: map to background 0 and warn (default), or fail like mmseg",
    )
    add_common_args(p)
    p.set_defaults(func=main)
    return p
