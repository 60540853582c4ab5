"""Pictures of predictions: a colour-coded label PNG and an overlay with a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ovseg.data.specs import voc_palette
from ovseg.utils.io import atomic_open, atomic_save_png

PALETTE = voc_palette(256)
# VOC's colour 0 is black; start at 1 so class 0 of an arbitrary vocabulary is visible.
CLASS_COLOURS = PALETTE[1:]


def colourise(pred: np.ndarray) -> np.ndarray:
    return CLASS_COLOURS[pred % len(CLASS_COLOURS)]


def overlay_with_legend(image: np.ndarray, pred: np.ndarray, class_names: list[str], alpha: float = 0.5) -> Image.Image:
    """``image`` uint8 HxWx3, ``pred`` class ids HxW -> blended picture with a legend of the classes present."""
    blended = (image * (1 - alpha) + colourise(pred) * alpha).astype(np.uint8)
    present = [int(c) for c in np.unique(pred)]
    font = ImageFont.load_default()
    row = 16
    legend_w = 12 + max(len(class_names[c]) for c in present) * 7 + 24
    height = max(image.shape[0], row * len(present) + 8)
    canvas = Image.new("RGB", (image.shape[1] + legend_w, height), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, c in enumerate(present):
        x, y = image.shape[1] + 6, 4 + i * row
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in CLASS_COLOURS[c % len(CLASS_COLOURS)]))
        draw.text((x + 18, y), class_names[c], fill=(0, 0, 0), font=font)
    return canvas


def save_prediction(out_dir: str | Path, file_id: str, image: torch.Tensor, pred: torch.Tensor,
                    class_names: list[str]) -> Path:
    """Write ``<id>_label.png`` (palette PNG, pixel value = class index) and ``<id>_overlay.png``."""
    out_dir = Path(out_dir)
    pred_np = pred.cpu().numpy().astype(np.int64)
    image_np = (image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    label_path = out_dir / f"{file_id}_label.png"
    if len(class_names) <= 256:
        atomic_save_png(label_path, pred_np.astype(np.uint8), palette=np.concatenate([CLASS_COLOURS, PALETTE[:1]]))
    else:  # more classes than a palette holds: 16-bit ids
        with atomic_open(label_path, "wb") as f:
            Image.fromarray(pred_np.astype(np.uint16)).save(f, format="PNG")
    with atomic_open(out_dir / f"{file_id}_overlay.png", "wb") as f:
        overlay_with_legend(image_np, pred_np, class_names).save(f, format="PNG")
    return label_path
