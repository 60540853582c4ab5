"""VOC 2012 "aug" training set: SBD ``.mat`` labels + VOC's own PNGs -> ``SegmentationClassAug``.

Follows mmsegmentation's ``tools/dataset_converters/voc_aug.py`` (SBD ``GTcls.Segmentation`` read with
scipy) and additionally copies VOC 2012's ``SegmentationClass`` labels of the train and val ids, so that
every id of ``trainaug.txt`` has a label in the one folder ``SegmentationClassAug`` (what the usual
``SegmentationClassAug.zip`` holds). For an id labelled by both, VOC's annotation wins -- the same label
mmseg's ``train.txt`` + ``aug.txt`` setup reads from ``SegmentationClass``.

Output (under the VOCdevkit root):
``VOC2012/SegmentationClassAug/<id>.png`` (palette PNG, 0..20, 255 = boundary in VOC's own labels),
``VOC2012/ImageSets/Segmentation/trainaug.txt`` = (SBD train + SBD val + VOC train) - VOC val (10,582),
``VOC2012/ImageSets/Segmentation/aug.txt`` = (SBD train + SBD val) - VOC train - VOC val (9,118).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.io import loadmat

from ovseg.data.specs import voc_palette
from ovseg.tools.convert._common import (
    ConversionError,
    add_common_args,
    list_text,
    print_summary,
    read_id_list,
    require_dir,
    run_parallel,
    split_todo,
    unexpected_values,
)
from ovseg.utils.io import atomic_save_png, atomic_write_text

NAME = "voc_aug"
NUM_CLASSES = 21
EXPECTED = {"trainaug": 10582, "aug": 9118}
#: label values a VOC/SBD class PNG may hold: 0..20 and 255.
_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[:NUM_CLASSES] = True
_ALLOWED[255] = True


def _check_values(label: np.ndarray, path: Path) -> np.ndarray:
    bad = unexpected_values(label, _ALLOWED)
    if bad:
        raise ConversionError(f"{path}: label values {bad[:10]} outside 0..20 and 255 (not a VOC class map)")
    return label


def read_sbd_mat(path: str | Path) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``dataset/cls/*.mat`` file as uint8 ``[H,W]``."""
    path = Path(path)
    try:
        data = loadmat(str(path))
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except Exception as e:  # scipy raises ValueError/TypeError/MatReadError on corrupt files
        raise ConversionError(f"{path}: cannot read the .mat file ({e})") from None
    gt = data.get("GTcls")
    if gt is None:
        keys = ", ".join(k for k in data if not k.startswith("__")) or "none"
        raise ConversionError(f"{path}: no 'GTcls' struct (variables: {keys}); expected an SBD dataset/cls/*.mat file")
    if gt.dtype.names is None or "Segmentation" not in gt.dtype.names or gt.size == 0:
        raise ConversionError(f"{path}: 'GTcls' has no 'Segmentation' field (fields: {gt.dtype.names})")
    seg = np.asarray(gt.flat[0]["Segmentation"])  # mmseg: data['GTcls'][0]['Segmentation'][0]
    if seg.ndim != 2 or seg.size == 0 or not np.issubdtype(seg.dtype, np.integer):
        raise ConversionError(
            f"{path}: GTcls.Segmentation is a {seg.dtype} array of shape {seg.shape}, expected a 2-D integer map"
        )
    if seg.min() < 0 or seg.max() > 255:
        raise ConversionError(f"{path}: GTcls.Segmentation values span {seg.min()}..{seg.max()}, expected 0..20")
    return _check_values(seg.astype(np.uint8), path)


def read_voc_png(path: str | Path) -> np.ndarray:
    """A VOC ``SegmentationClass`` PNG as class indices: palette indices, grey values, or RGB colours
    looked up in the VOC colour map."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L"):
                label = np.array(im, dtype=np.uint8)
            elif im.mode == "RGB":
                rgb = np.asarray(im).astype(np.int64)
                code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
                pal = voc_palette().astype(np.int64)
                pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
                order = np.argsort(pal_code)
                pos = np.minimum(np.searchsorted(pal_code[order], code), 255)
                found = pal_code[order][pos] == code
                if not found.all():
                    colours = np.unique(code[~found])[:5]
                    raise ConversionError(
                        f"{path}: RGB label holds colours outside the VOC colour map "
                        f"({', '.join(f'#{c:06x}' for c in colours)})"
                    )
                label = order[pos].astype(np.uint8)
            else:
                raise ConversionError(f"{path}: label PNG has mode {im.mode}; expected a VOC palette PNG")
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ConversionError(f"{path}: cannot decode PNG ({e})") from None
    return _check_values(label, path)


def _convert_one(task: tuple[str, str, str]) -> str:
    kind, src, dst = task
    label = read_sbd_mat(src) if kind == "sbd" else read_voc_png(src)
    atomic_save_png(dst, label, palette=voc_palette())
    return kind


def _sbd_dataset_dir(sbd: Path) -> Path:
    for candidate in (sbd / "dataset", sbd, sbd / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir():
            return candidate
    raise ConversionError(f"{sbd}: no SBD dataset/cls folder found (expected benchmark_RELEASE/dataset/cls/*.mat)")


def convert_voc_aug(
    devkit: str | Path, sbd: str | Path, nproc: int = 1, overwrite: bool = False
) -> dict[str, Any]:
    """Build ``SegmentationClassAug`` and the ``trainaug``/``aug`` lists under ``devkit`` (``VOCdevkit``)."""
    devkit, sbd = Path(devkit), Path(sbd)
    voc = require_dir(devkit / "VOC2012", "VOC2012")
    sets = voc / "ImageSets" / "Segmentation"
    voc_train = read_id_list(sets / "train.txt", "VOC 2012 train")
    voc_val = read_id_list(sets / "val.txt", "VOC 2012 val")
    ds = _sbd_dataset_dir(sbd)
    sbd_ids = read_id_list(ds / "train.txt", "SBD train") + read_id_list(ds / "val.txt", "SBD val")

    mats = {p.stem: p for p in sorted((ds / "cls").glob("*.mat"))}
    missing = [i for i in sbd_ids if i not in mats]
    if missing:
        raise ConversionError(
            f"{ds / 'cls'}: {len(missing)} ids of SBD train/val.txt have no .mat file, e.g. {missing[:3]}"
        )
    voc_ids = sorted(set(voc_train) | set(voc_val))
    voc_dir = voc / "SegmentationClass"
    missing = [i for i in voc_ids if not (voc_dir / f"{i}.png").is_file()]
    if missing:
        raise ConversionError(f"{voc_dir}: {len(missing)} ids of train/val.txt have no label PNG, e.g. {missing[:3]}")

    out_dir = voc / "SegmentationClassAug"
    sources = {i: ("sbd", str(p)) for i, p in mats.items()}
    sources.update({i: ("voc", str(voc_dir / f"{i}.png")) for i in voc_ids})  # VOC's own labels win
    tasks = [(kind, src, str(out_dir / f"{i}.png")) for i, (kind, src) in sorted(sources.items())]
    todo, skipped = split_todo(((t, Path(t[2])) for t in tasks), overwrite)
    kinds = run_parallel(_convert_one, todo, nproc, desc="voc_aug")

    val = set(voc_val)
    trainaug = sorted((set(sbd_ids) | set(voc_train)) - val)
    aug = sorted(set(sbd_ids) - set(voc_train) - val)
    atomic_write_text(sets / "trainaug.txt", list_text(trainaug))
    atomic_write_text(sets / "aug.txt", list_text(aug))
    return {
        "labels": len(tasks),
        "from_sbd": kinds.count("sbd"),
        "from_voc": kinds.count("voc"),
        "skipped": skipped,
        "trainaug": len(trainaug),
        "aug": len(aug),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = convert_voc_aug(args.devkit, args.sbd, args.nproc, args.overwrite)
    print_summary(NAME, summary)
    print(f"  (official VOC 2012 + SBD: trainaug={EXPECTED['trainaug']}, aug={EXPECTED['aug']}, labels=12031)")
    return summary


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="VOC 2012 + SBD -> SegmentationClassAug, trainaug.txt, aug.txt",
        description=(
            "Convert SBD's dataset/cls/*.mat (GTcls.Segmentation) and VOC 2012's own SegmentationClass PNGs of "
            "the train/val ids into VOC2012/SegmentationClassAug/*.png (VOC's label wins where both exist), and "
            "write VOC2012/ImageSets/Segmentation/trainaug.txt ((SBD train+val + VOC train) - VOC val) and "
            "aug.txt (SBD train+val - VOC train - VOC val)."
        ),
    )
    p.add_argument("devkit", type=Path, help="the VOCdevkit folder (holding VOC2012/)")
    p.add_argument(
        "sbd", type=Path, help="SBD's benchmark_RELEASE folder (holding dataset/cls/*.mat, dataset/{train,val}.txt)"
    )
    add_common_args(p)
    p.set_defaults(func=main)
    return p
