"""``ovseg masks sam | downscale | dino``: turn image folders into SA-1B-format training data for PixelCLIP.

Every command writes, per image, ``<out>/<relative path>.jpg`` (the image, hard-linked or copied; resized for
``downscale``) and ``.json`` (``{"image": {...}, "annotations": [{"segmentation": COCO RLE, ...}]}``), resumes by
skipping images whose JSON exists, shows progress, and writes every file atomically.

    ovseg masks sam --images photos/ --out data/sam_masks --checkpoint sam_vit_h_4b8939.pth
    ovseg masks downscale --src data/sa1b --out data/sa1b_half          # the authors' halving (short side 750)
    ovseg masks dino --images photos/ --out data/dino_masks --weights dino_deitsmall16_pretrain.pth
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from ovseg.data.sa1b import IMAGE_SUFFIXES, decode_masks, downscale_image, downscaled_size, encode_mask, find_pairs
from ovseg.data.files import DataError, read_image
from ovseg.utils.io import atomic_open

__all__ = ["register", "generate_masks", "sam_generator", "dino_generator", "downscale_folder", "mask_record"]

MaskGenerator = Callable[[np.ndarray], list[dict[str, Any]]]


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def mask_record(image_id: int, file_name: str, height: int, width: int, annotations: Iterable[dict[str, Any]]
                ) -> dict[str, Any]:
    """An SA-1B JSON record. ``annotations`` are SamAutomaticMaskGenerator-style dicts with ``segmentation`` a
    binary mask or a COCO RLE; the other SAM fields are kept when present."""
    anns = []
    for i, ann in enumerate(annotations):
        seg = ann["segmentation"]
        if isinstance(seg, np.ndarray):
            mask, rle = seg.astype(bool), encode_mask(seg)
        else:
            rle = {"size": [int(v) for v in seg["size"]],
                   "counts": seg["counts"].decode("ascii") if isinstance(seg["counts"], bytes) else seg["counts"]}
            mask = None
        if rle["size"] != [height, width]:
            raise ValueError(f"mask {i} of {file_name} has size {rle['size']}, image is {height}x{width}")
        if mask is None and ("area" not in ann or "bbox" not in ann):
            mask = decode_masks([rle], height, width)[0]
        entry = {"id": i, "segmentation": rle,
                 "area": int(ann["area"]) if "area" in ann else int(mask.sum()),
                 "bbox": [int(round(v)) for v in ann["bbox"]] if "bbox" in ann else _bbox(mask)}
        for key in ("predicted_iou", "stability_score", "crop_box", "point_coords"):
            if key in ann:
                value = ann[key]
                entry[key] = np.asarray(value).tolist() if not isinstance(value, (int, float)) else float(value)
        anns.append(entry)
    return {"image": {"image_id": image_id, "width": width, "height": height, "file_name": file_name},
            "annotations": anns}


def _place_image(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def generate_masks(images: str | Path, out: str | Path, generator: MaskGenerator, progress: bool = True,
                   limit: int | None = None) -> dict[str, int]:
    """Run ``generator`` (image HWC uint8 -> list of mask dicts) over a folder; returns counts
    (written, skipped as done, failed). Images already with a JSON in ``out`` are skipped (resumable)."""
    images, out = Path(images), Path(out)
    paths = list_images(images)[:limit]
    counts = {"written": 0, "done": 0, "failed": 0}
    for index, path in enumerate(tqdm(paths, desc="masks", disable=not progress, unit="img")):
        rel = path.relative_to(images)
        json_path = (out / rel).with_suffix(".json")
        if json_path.is_file():
            counts["done"] += 1
            continue
        try:
            image = read_image(path)
        except DataError as e:
            tqdm.write(f"skipping {e}")
            counts["failed"] += 1
            continue
        record = mask_record(index + 1, path.name, image.shape[0], image.shape[1], generator(image))
        _place_image(path, out / rel)
        with atomic_open(json_path, "w", encoding="utf-8") as f:
            json.dump(record, f)
        counts["written"] += 1
    return counts


def sam_generator(checkpoint: str | None, model_type: str = "vit_h", device: str = "cpu", model=None,
                  **amg_kwargs: Any) -> MaskGenerator:
    """A ``SamAutomaticMaskGenerator`` (COCO RLE output) from a SAM checkpoint, or around a given ``model``."""
    try:
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
    except ImportError as err:
        raise ImportError("`ovseg masks sam` needs segment-anything: pip install 'ovseg[sam]'") from err
    if model is None:
        if not checkpoint or not Path(checkpoint).is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {checkpoint}")
        if model_type not in sam_model_registry:
            raise ValueError(f"unknown SAM model type {model_type!r}; one of {sorted(sam_model_registry)}")
        from ovseg.utils.io import load_weights_file

        # segment_anything's own loading calls torch.load without weights_only: read the file safely here
        state = load_weights_file(checkpoint, "SAM checkpoint", allow_numpy=True)
        model = sam_model_registry[model_type](checkpoint=None)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{checkpoint}: not a SAM {model_type} checkpoint (--model-type picks vit_h, vit_l or "
                             f"vit_b): {str(err).splitlines()[0]}") from None
    model.to(device).eval()
    amg = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **amg_kwargs)
    return amg.generate


def dino_generator(masker, short_side: int | None = 448, device: str = "cpu") -> MaskGenerator:
    """k-means DINO masks for one image (resized to ``short_side`` for the features), one-hot masks
    nearest-upsampled to the image size; empty clusters are left out."""
    import torch
    import torch.nn.functional as F

    masker = masker.to(device).eval()

    def generate(image: np.ndarray) -> list[dict[str, Any]]:
        height, width = image.shape[:2]
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(device)
        if short_side:
            scale = short_side / min(height, width)
            x = F.interpolate(x, size=(max(1, round(height * scale)), max(1, round(width * scale))),
                              mode="bilinear", align_corners=False)
        masks = masker(x)[0]  # [k, h', w'] bool
        masks = F.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0].bool().cpu().numpy()
        return [{"segmentation": m} for m in masks if m.any()]

    return generate


def downscale_folder(src: str | Path, out: str | Path, factor: float = 0.5, progress: bool = True,
                     quality: int = 95) -> dict[str, int]:
    """Resize SA-1B images (bilinear, antialiased) and masks (nearest) by ``factor``; RLE, areas and boxes are
    recomputed. Resumable: pairs whose output JSON exists are skipped."""
    src, out = Path(src), Path(out)
    pairs, missing = find_pairs(src)
    counts = {"written": 0, "done": 0, "failed": len(missing)}
    for image_path, json_path in tqdm(pairs, desc="downscale", disable=not progress, unit="img"):
        rel = image_path.relative_to(src)
        out_json = (out / rel).with_suffix(".json")
        if out_json.is_file():
            counts["done"] += 1
            continue
        image = read_image(image_path)
        height, width = image.shape[:2]
        new_h, new_w = downscaled_size(height, width, factor)
        record = json.loads(json_path.read_text(encoding="utf-8"))
        anns = record.get("annotations", [])
        rles = [a["segmentation"] for a in anns]
        for i, rle in enumerate(rles):
            if [int(v) for v in rle["size"]] != [height, width]:
                raise DataError(f"{json_path}: annotation {i} has RLE size {rle['size']}, image is {height}x{width}")
        masks = decode_masks(rles, height, width)
        new_anns = []
        for ann, mask in zip(anns, masks):
            small = cv2.resize(mask.astype(np.uint8), (new_w, new_h), interpolation=cv2.INTER_NEAREST).astype(bool)
            entry = dict(ann, segmentation=encode_mask(small), area=int(small.sum()), bbox=_bbox(small))
            for key in ("point_coords", "crop_box"):
                if key in ann:
                    entry[key] = (np.asarray(ann[key], dtype=float) * factor).tolist()
            new_anns.append(entry)
        info = dict(record.get("image", {}), width=new_w, height=new_h)
        resized = Image.fromarray(downscale_image(image, factor))
        out_image = out / rel
        out_image.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out_image, "wb") as f:
            resized.save(f, format="JPEG" if out_image.suffix.lower() in (".jpg", ".jpeg") else "PNG",
                         quality=quality)
        with atomic_open(out_json, "w", encoding="utf-8") as f:
            json.dump({**record, "image": info, "annotations": new_anns}, f)
        counts["written"] += 1
    return counts


# -- CLI ------------------------------------------------------------------------------------------------------------
def _report(counts: dict[str, int], out: str) -> int:
    print(f"{out}: {counts['written']} written, {counts['done']} already done, {counts['failed']} failed")
    return 0


def _sam(ns: argparse.Namespace) -> int:
    amg = dict(points_per_side=ns.points_per_side, points_per_batch=ns.points_per_batch,
               pred_iou_thresh=ns.pred_iou_thresh, stability_score_thresh=ns.stability_score_thresh,
               min_mask_region_area=ns.min_mask_region_area)
    generator = sam_generator(ns.checkpoint, ns.model_type, _device(ns.device), **amg)
    return _report(generate_masks(ns.images, ns.out, generator, not ns.no_progress, ns.limit), ns.out)


def _dino(ns: argparse.Namespace) -> int:
    from ovseg.methods.pixelclip.dino import DinoConfig, DinoMasker

    weights = ns.weights if ns.weights else "hub"
    masker = DinoMasker(DinoConfig(name=ns.model, weights=weights, clusters=ns.clusters, iterations=ns.iterations))
    generator = dino_generator(masker, ns.short_side, _device(ns.device))
    return _report(generate_masks(ns.images, ns.out, generator, not ns.no_progress, ns.limit), ns.out)


def _downscale(ns: argparse.Namespace) -> int:
    return _report(downscale_folder(ns.src, ns.out, ns.factor, not ns.no_progress), ns.out)


def register(commands) -> None:
    masks = commands.add_parser("masks", help="class-agnostic masks for PixelCLIP: sam, dino, downscale")
    sub = masks.add_subparsers(dest="masks_command", required=True)

    sam = sub.add_parser("sam", help="SamAutomaticMaskGenerator over an image folder -> SA-1B JSONs")
    sam.add_argument("--images", required=True)
    sam.add_argument("--out", required=True)
    sam.add_argument("--checkpoint", required=True, help="SAM weights, e.g. sam_vit_h_4b8939.pth")
    sam.add_argument("--model-type", default="vit_h", choices=["vit_h", "vit_l", "vit_b", "default"])
    sam.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    sam.add_argument("--points-per-side", type=int, default=32)
    sam.add_argument("--points-per-batch", type=int, default=64)
    sam.add_argument("--pred-iou-thresh", type=float, default=0.88)
    sam.add_argument("--stability-score-thresh", type=float, default=0.95)
    sam.add_argument("--min-mask-region-area", type=int, default=0)
    sam.add_argument("--limit", type=int, default=None)
    sam.add_argument("--no-progress", action="store_true")
    sam.set_defaults(func=_sam)

    dino = sub.add_parser("dino", help="k-means on DINO ViT-S/16 features per image -> SA-1B JSONs")
    dino.add_argument("--images", required=True)
    dino.add_argument("--out", required=True)
    dino.add_argument("--weights", default=None, help="local DINO weights file (default: the hub through timm)")
    dino.add_argument("--model", default="vit_small_patch16_224.dino", help="timm model name")
    dino.add_argument("--clusters", type=int, default=16)
    dino.add_argument("--iterations", type=int, default=100)
    dino.add_argument("--short-side", type=int, default=448, help="feature resolution (short side, pixels)")
    dino.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    dino.add_argument("--limit", type=int, default=None)
    dino.add_argument("--no-progress", action="store_true")
    dino.set_defaults(func=_dino)

    down = sub.add_parser("downscale", help="resize SA-1B images and masks (default: halve, as the authors)")
    down.add_argument("--src", required=True)
    down.add_argument("--out", required=True)
    down.add_argument("--factor", type=float, default=0.5)
    down.add_argument("--no-progress", action="store_true")
    down.set_defaults(func=_downscale)


def _device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu`` (resolved when a command runs: `--help` needs no torch)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
