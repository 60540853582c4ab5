"""Pictures of predictions: a colour-coded label PNG and an overlay with a legend."""

from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ovseg.data.classnames import display_names
from ovseg.data.specs import voc_palette
from ovseg.utils.io import atomic_open, atomic_save_png

PALETTE = voc_palette(256)
# VOC's colour 0 is black; start at 1 so class 0 of an arbitrary vocabulary is visible.
CLASS_COLOURS = PALETTE[1:]


def colourise(pred: np.ndarray) -> np.ndarray:
    return CLASS_COLOURS[pred % len(CLASS_COLOURS)]


#: TrueType fonts with accented Latin, Greek and Cyrillic glyphs, tried in this order (Pillow also searches the system
#: font folders by file name); Pillow's built-in font draws "café" as "caf□"
UNICODE_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "Arial Unicode.ttf",
                 "arial.ttf")


@functools.lru_cache(maxsize=None)
def label_font(size: int = 11) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font for class names in any script the system (or matplotlib's bundled DejaVu) covers; Pillow's default
    with a warning otherwise."""
    candidates: list[str] = list(UNICODE_FONTS)
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:  # a copy of DejaVu Sans ships with matplotlib
        candidates.append(str(Path(spec.submodule_search_locations[0]) / "mpl-data/fonts/ttf/DejaVuSans.ttf"))
    for name in candidates:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    warnings.warn("no Unicode TrueType font found (e.g. apt-get install fonts-dejavu-core): class names outside "
                  "ASCII are drawn with boxes in pictures", stacklevel=2)
    return ImageFont.load_default()


def blend(image: np.ndarray, pred: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` uint8 HxWx3 with the class colours of ``pred`` (class ids HxW) laid over it."""
    return (image * (1 - alpha) + colourise(pred) * alpha).astype(np.uint8)


def overlay_with_legend(image: np.ndarray, pred: np.ndarray, class_names: list[str], alpha: float = 0.5) -> Image.Image:
    """``image`` uint8 HxWx3, ``pred`` class ids HxW -> blended picture with a legend of the classes present."""
    blended = blend(image, pred, alpha)
    present = [int(c) for c in np.unique(pred)]
    font = label_font()
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
    save_label_png(label_path, pred_np, len(class_names))
    with atomic_open(out_dir / f"{file_id}_overlay.png", "wb") as f:
        overlay_with_legend(image_np, pred_np, class_names).save(f, format="PNG")
    return label_path


# -- test-run pictures: gallery (image | ground truth | prediction) and per-class IoU charts ----------------
IGNORE_COLOUR = np.array([255, 255, 255], dtype=np.uint8)


def colourise_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Class ids -> colours as :func:`colourise`; ``ignore_index`` pixels white."""
    label = np.asarray(label, dtype=np.int64)
    out = colourise(np.where(label == ignore_index, 0, label))
    out[label == ignore_index] = IGNORE_COLOUR
    return out


def gallery_panel(image: np.ndarray, label: np.ndarray, pred: np.ndarray | list[tuple[str, np.ndarray]],
                  class_names: list[str], title: str = "", ignore_index: int = 255) -> Image.Image:
    """``image`` | ground truth | prediction side by side, a legend of the classes present below.
    ``pred`` may also be a list of ``(name, prediction)``: one captioned panel each (methods compared)."""
    h, w = image.shape[:2]
    preds = [("prediction", pred)] if isinstance(pred, np.ndarray) else list(pred)
    font = label_font()
    gap = 4
    head = 30 if title else 16
    panels = [(image, "image"), (colourise_label(label, ignore_index), "ground truth")]
    panels += [(colourise(p), name) for name, p in preds]
    width = len(panels) * w + (len(panels) - 1) * gap
    present = {int(c) for c in np.unique(label) if c != ignore_index}
    for _, p in preds:
        present |= {int(c) for c in np.unique(p)}
    present = [c for c in sorted(present) if 0 <= c < len(class_names)]
    per_row = max(1, width // 150)
    legend_h = 16 * ((len(present) + per_row - 1) // per_row) + 4
    canvas = Image.new("RGB", (width, head + h + legend_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 2), title, fill=(0, 0, 0), font=font)
    for i, (array, name) in enumerate(panels):
        x = i * (w + gap)
        canvas.paste(Image.fromarray(np.ascontiguousarray(array.astype(np.uint8))), (x, head))
        draw.text((x + 2, head - 14), name, fill=(0, 0, 0), font=font)
    for k, c in enumerate(present):
        x, y = (k % per_row) * 150 + 4, head + h + 4 + (k // per_row) * 16
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v) for v in CLASS_COLOURS[c % len(CLASS_COLOURS)]))
        draw.text((x + 14, y - 1), class_names[c][:20], fill=(0, 0, 0), font=font)
    return canvas


def stack_vertically(pictures: list[Image.Image], gap: int = 6) -> Image.Image:
    """Pictures one under another on white, left-aligned."""
    width = max(p.width for p in pictures)
    canvas = Image.new("RGB", (width, sum(p.height for p in pictures) + gap * (len(pictures) - 1)), (255, 255, 255))
    y = 0
    for p in pictures:
        canvas.paste(p, (0, y))
        y += p.height + gap
    return canvas


def iou_bar_chart(per_class: dict[str, dict], title: str, width: int = 640) -> Image.Image:
    """One horizontal bar per class (IoU in percent, ``n/a`` where undefined), in the dataset's class order."""
    font = label_font()
    row, label_w, head = 14, 170, 22
    bar_w = width - label_w - 50
    canvas = Image.new("RGB", (width, head + row * len(per_class) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    for i, (name, scores) in enumerate(per_class.items()):
        y = head + i * row
        iou = scores.get("IoU")
        draw.text((4, y), name[:26], fill=(0, 0, 0), font=font)
        if iou is None:
            draw.text((label_w, y), "n/a", fill=(128, 128, 128), font=font)
            continue
        colour = tuple(int(v) for v in CLASS_COLOURS[i % len(CLASS_COLOURS)])
        draw.rectangle([label_w, y + 2, label_w + max(1, int(bar_w * iou / 100)), y + row - 3], fill=colour)
        draw.text((label_w + int(bar_w * iou / 100) + 4, y), f"{iou:.1f}", fill=(0, 0, 0), font=font)
    return canvas


def collect_gallery(session, size: int) -> dict[str, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]]:
    """The predictions the evaluator of ``session`` (anything holding ``.evaluator``) kept while scoring (its
    ``gallery_size`` first images per dataset on this process; under DDP, rank 0's shard) ->
    ``{dataset: [(id, image, label, pred)]}``; nothing is predicted again."""
    if size <= 0 or session.evaluator is None:
        return {}
    return {name: entry.gallery[:size] for name, entry in session.evaluator.datasets.items() if entry.gallery}


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:80]


def save_label_png(path: str | Path, pred: np.ndarray, num_classes: int) -> None:
    """Class ids as a PNG: palette colours (the ones of :func:`colourise`) up to 256 classes, else 16-bit."""
    if num_classes <= 256:
        atomic_save_png(path, pred.astype(np.uint8), palette=np.concatenate([CLASS_COLOURS, PALETTE[:1]]))
    else:
        with atomic_open(path, "wb") as f:
            Image.fromarray(pred.astype(np.uint16)).save(f, format="PNG")


def gallery_pred_path(out_dir: str | Path, dataset: str, k: int, file_id: str) -> Path:
    """Where :func:`save_test_pictures` puts the raw prediction (class ids) of gallery image ``k``."""
    return Path(out_dir) / dataset / f"gallery_{k}_{_safe_name(file_id)}_pred.png"


def save_test_pictures(out_dir: str | Path, results: dict, gallery: dict) -> list[Path]:
    """PNG files: ``<dataset>/per_class_iou.png``, ``<dataset>/gallery_<k>_<id>.png`` (image | ground truth |
    prediction) and ``<dataset>/gallery_<k>_<id>_pred.png`` (the prediction's class ids, for comparisons)."""
    out_dir = Path(out_dir)
    written = []
    for name, d in results["datasets"].items():
        if "per_class" not in d:
            continue
        path = out_dir / name / "per_class_iou.png"
        with atomic_open(path, "wb") as f:
            iou_bar_chart(d["per_class"], f"{name}: per-class IoU (mIoU {d.get('mIoU')})").save(f, format="PNG")
        written.append(path)
        display = display_names(d["class_names"])
        for k, (file_id, image, label, pred) in enumerate(gallery.get(name, [])):
            path = out_dir / name / f"gallery_{k}_{_safe_name(file_id)}.png"
            with atomic_open(path, "wb") as f:
                gallery_panel(image, label, pred, display, title=file_id).save(f, format="PNG")
            written.append(path)
            pred_path = gallery_pred_path(out_dir, name, k, file_id)
            save_label_png(pred_path, pred, len(display))
            written.append(pred_path)
    return written


def log_wandb_media(run, results: dict, gallery: dict, prefix: str = "test") -> dict:
    """wandb Tables of the scores, a per-class IoU bar chart per dataset and a gallery table
    (image with ground-truth/prediction masks | ground truth | prediction). Returns what was logged."""
    import wandb

    rows = [[n, d.get("num_images"), d.get("mIoU"), d.get("pAcc"), d.get("mAcc")]
            for n, d in results["datasets"].items()]
    payload: dict = {
        f"{prefix}/results": wandb.Table(columns=["dataset", "images", "mIoU", "pAcc", "mAcc"], data=rows)}
    for name, d in results["datasets"].items():
        if "per_class" not in d:
            continue
        per_class = wandb.Table(columns=["class", "IoU", "Acc"],
                                data=[[c, v.get("IoU"), v.get("Acc")] for c, v in d["per_class"].items()])
        payload[f"{prefix}/{name}/per_class"] = per_class
        defined = wandb.Table(columns=["class", "IoU"],
                              data=[[c, v["IoU"]] for c, v in d["per_class"].items() if v.get("IoU") is not None])
        payload[f"{prefix}/{name}/per_class_IoU"] = wandb.plot.bar(defined, "class", "IoU",
                                                                    title=f"{name}: per-class IoU")
        items = gallery.get(name) or []
        if items:
            display = display_names(d["class_names"])
            labels = {i: n for i, n in enumerate(display)}
            table = wandb.Table(columns=["id", "image", "ground truth", "prediction"])
            for file_id, image, label, pred in items:
                masks = {
                    "ground_truth": {"mask_data": label.astype(np.int64), "class_labels": {**labels, 255: "ignore"}},
                    "prediction": {"mask_data": pred.astype(np.int64), "class_labels": labels},
                }
                table.add_data(file_id, wandb.Image(image, masks=masks), wandb.Image(colourise_label(label)),
                               wandb.Image(colourise(pred)))
            payload[f"{prefix}/{name}/gallery"] = table
    run.log(payload)
    return payload


def log_test_media(loggers, session, results: dict, gallery_size: int = 4) -> list[Path]:
    """After ``ovseg test``: with a wandb logger, tables, bar charts and the gallery go to wandb; with the
    CSV (or any file) logger the same pictures are PNG files under ``<log dir>/media``. Returns the files."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = list(loggers)
    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    file_dirs = [Path(lg.log_dir) for lg in loggers if not isinstance(lg, WandbLogger) and getattr(lg, "log_dir", None)]
    if not wandb_loggers and not file_dirs:
        return []
    gallery = collect_gallery(session, gallery_size)
    written = []
    for directory in file_dirs:
        written += save_test_pictures(directory / "media", results, gallery)
    for lg in wandb_loggers:
        log_wandb_media(lg.experiment, results, gallery)
    return written
