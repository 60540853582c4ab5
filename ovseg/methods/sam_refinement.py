"""Trident's SAM refinement of a label map (github YuHengsss/Trident, ``seg_utils/utils.py`` ``sam_refinement`` /
``split_connected_regions`` / ``map_refinement_coarse`` / ``map_failed_regions``; called from ``trident.py``
``postprocess_result`` when ``--sam_refine`` sets ``sam_refinement``).

The whole image's class probabilities ``[C,H,W]`` and label map ``[H,W]`` (after the probability threshold) go in:

1. both are halved (labels nearest, probabilities bilinear); where the top probability is below ``coarse_thresh``
   the label becomes an extra "uncertain" class that is not split (with ``coarse_thresh`` 0 every class is split);
2. each class whose top probability reaches ``coarse_thresh`` is split into 8-connected regions of at least
   ``minimal_area`` (half-resolution) pixels; each region prompts SAM with its box (``masks_to_boxes``: inclusive
   corners), the region's most probable pixel as a foreground point, and the class's probabilities (long side
   256, padded, kept above ``coarse_thresh`` and scaled by ``sam_mask_coff``) as the mask prompt; one mask each;
3. a region's mask is kept where SAM's predicted IoU exceeds ``sam_iou_thresh``, else the region "failed";
4. each class's score is the max over its kept masks of ``sigmoid(mask logit) · class probability`` inside the
   union of its masks (0 elsewhere); the label is the argmax of these scores, and the coarse label where all are 0;
5. failed regions: the refined scores are raised to the class probabilities there (``map_failed_regions``); its
   label rule compares the probabilities with the scores *after* that raise, so it never changes a label (as there).

Reference quirks kept (they produced the published numbers): prompts are scaled from the half-resolution map's size
to SAM's input as if that map were the image SAM read; the mask prompt is resized with the *label* image's aspect; it
is given as one unbatched ``[1,256,256]`` mask, so SAM's ``LayerNorm2d`` in ``mask_downscaling`` normalises over
rows rather than channels (:func:`predict_masks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from skimage import measure
from torch import Tensor

#: ``sam_refinement``'s ``down_ratio``: the regions are found on the half-resolution maps
DOWN_RATIO = 2


@dataclass(frozen=True)
class SamRefinementSettings:
    """``sam_refinement``'s arguments (``configs/base_config.py``: ``coarse_thresh`` 0.2, ``minimal_area`` 225,
    ``sam_iou_thresh`` 0.80; ``trident.py``'s default ``sam_mask_coff`` 0.005; ``cfg_*.py`` set ``coarse_thresh``
    per dataset)."""

    coarse_thresh: float = 0.2
    minimal_area: int = 225
    sam_mask_coff: float = 0.005
    sam_iou_thresh: float = 0.8


@dataclass
class Regions:
    """One class's connected regions: masks ``[N,h,w]`` (uint8), boxes ``[N,4]`` (x1, y1, x2, y2 inclusive),
    points ``[N,2]`` (x, y)."""

    masks: Tensor
    boxes: Tensor
    points: Tensor


def connected_regions(class_mask: np.ndarray, class_probs: Tensor, minimal_area: int) -> Regions | None:
    """``split_connected_regions`` for one class: its 8-connected regions of at least ``minimal_area`` pixels, each
    with its box and its most probable pixel (the first in row-major order among ties); None without one."""
    labelled = measure.label(class_mask, connectivity=2)
    masks, points = [], []
    for region in range(1, int(labelled.max()) + 1):
        mask = labelled == region
        if mask.sum() < minimal_area:
            continue
        flat = int(torch.argmax(class_probs * torch.from_numpy(mask).to(class_probs)))
        points.append((flat % class_probs.shape[1], flat // class_probs.shape[1]))
        masks.append(mask.astype(np.uint8))
    if not masks:
        return None
    stacked = torch.from_numpy(np.stack(masks))
    return Regions(stacked, region_boxes(stacked), torch.tensor(points))


def region_boxes(masks: Tensor) -> Tensor:
    """``torchvision.ops.masks_to_boxes``: ``[N,h,w]`` -> ``[N,4]`` float (x1, y1, x2, y2), the extreme pixels'
    indices (inclusive)."""
    boxes = []
    for mask in masks.bool():
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]))
    return torch.stack(boxes).float()


@torch.no_grad()
def predict_masks(sam: torch.nn.Module, embedding: Tensor, regions: Regions, mask_prompt: Tensor,
                  prompt_frame: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``SamPredictor.predict_torch`` (one mask per region) on the image ``embedding`` ``[1,256,h,w]``: box and point
    prompts in ``prompt_frame``'s pixels, scaled to SAM's input; ``mask_prompt`` ``[1,256,256]`` (unbatched, as the
    reference passes it). -> low-resolution mask logits ``[N,1,256,256]`` and predicted IoUs ``[N]``."""
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(sam.image_encoder.img_size)
    device = embedding.device
    boxes = transform.apply_boxes_torch(regions.boxes.long(), prompt_frame).float().to(device)
    points = transform.apply_coords_torch(regions.points.long(), prompt_frame)[:, None].float().to(device)
    point_labels = torch.ones(points.shape[:2], device=device)
    sparse, dense = sam.prompt_encoder(points=(points, point_labels), boxes=boxes, masks=mask_prompt.to(device))
    low_res, iou = sam.mask_decoder(image_embeddings=embedding.float(), image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=False)
    return low_res, iou[:, 0]


def class_mask_prompt(class_probs: Tensor, label_size: tuple[int, int], settings: SamRefinementSettings,
                      side: int = 256) -> Tensor:
    """The mask prompt of one class: its half-resolution probabilities ``[h,w]`` resized bilinearly to the label
    image's long side ``side`` (SAM's mask-input side, ``prompt_encoder.mask_input_size``: 256, which the reference
    writes), zero-padded to ``side``², kept above ``coarse_thresh`` and scaled by ``sam_mask_coff``."""
    from segment_anything.utils.transforms import ResizeLongestSide

    height, width = ResizeLongestSide.get_preprocess_shape(*label_size, side)
    prompt = F.interpolate(class_probs[None, None].float(), size=(height, width), mode="bilinear",
                           align_corners=False)[0]
    prompt = F.pad(prompt, (0, side - width, 0, side - height))
    return torch.where(prompt > settings.coarse_thresh, settings.sam_mask_coff * prompt, torch.zeros_like(prompt))


def region_prompts(labels: Tensor, probs: Tensor, settings: SamRefinementSettings, mask_side: int = 256
                   ) -> Iterator[tuple[int, Regions, Tensor]]:
    """Steps 1-2 of the module docstring: per class to refine (in class order), its regions on the half-resolution
    maps and its mask prompt (``mask_side``: :func:`class_mask_prompt`)."""
    num_classes, height, width = probs.shape
    half = (height // DOWN_RATIO, width // DOWN_RATIO)
    labels_half = F.interpolate(labels[None, None].half(), size=half, mode="nearest")[0, 0].long()
    probs_half = F.interpolate(probs[None].float(), size=half, mode="bilinear", align_corners=False)[0]
    if settings.coarse_thresh > 0:
        labels_half[probs_half.max(0).values < settings.coarse_thresh] = num_classes  # "uncertain": not split
    labels_half_np = labels_half.cpu().numpy()
    for c in range(num_classes):
        if probs_half[c].max() < settings.coarse_thresh:
            continue
        regions = connected_regions(labels_half_np == c, probs_half[c].cpu(), settings.minimal_area)
        if regions is not None:
            yield c, regions, class_mask_prompt(probs_half[c], (height, width), settings, mask_side)


@torch.no_grad()
def sam_refine_labels(labels: Tensor, probs: Tensor, sam: torch.nn.Module, embedding: Tensor,
                      input_size: tuple[int, int], original_size: tuple[int, int],
                      settings: SamRefinementSettings) -> tuple[Tensor, Tensor]:
    """``sam_refinement``: labels ``[H,W]`` and class probabilities ``[C,H,W]`` of the whole image -> refined labels
    ``[H,W]`` and scores ``[C,H,W]`` (the module docstring's steps). ``sam``: a ``segment_anything`` ``Sam`` (its
    prompt encoder and mask decoder, in float); ``embedding``: its image encoder's output ``[1,256,64,64]`` for the
    image it read, resized to ``input_size`` from ``original_size`` (``SamPredictor.set_image``)."""
    num_classes, height, width = probs.shape
    probs = probs.float()
    half = (height // DOWN_RATIO, width // DOWN_RATIO)
    kept: dict[int, Tensor] = {}  # class -> low-resolution logits of its accepted masks
    failed = []
    for c, regions, prompt in region_prompts(labels, probs, settings, sam.prompt_encoder.mask_input_size[0]):
        low_res, iou = predict_masks(sam, embedding, regions, prompt, half)
        accepted = (iou > settings.sam_iou_thresh).cpu()
        if not bool(accepted.all()):
            failed.append(regions.masks[~accepted])
        if bool(accepted.any()):
            kept[c] = low_res[accepted.to(low_res.device)]
    if not kept:
        return labels, probs
    logits = sam.postprocess_masks(torch.cat(list(kept.values())), input_size, original_size)
    if tuple(logits.shape[-2:]) != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    logits = logits[:, 0].to(probs.device)
    scores = torch.zeros_like(probs)
    start = 0
    for c, class_logits in kept.items():
        own = logits[start : start + len(class_logits)]
        start += len(class_logits)
        union = (own > sam.mask_threshold).any(0)
        scores[c] = (own.sigmoid() * probs[c]).max(0).values * union
    refined = torch.where(scores.sum(0) == 0, labels, scores.argmax(0))
    if failed:
        masks = torch.cat(failed)[None].float()
        area = F.interpolate(masks, size=(height, width), mode="nearest")[0].any(0).to(probs.device)
        # map_failed_regions: scores raised to the probabilities there; its label rule then never fires
        scores = torch.maximum(scores, probs * area)
    return refined, scores


class _ImageSide(torch.nn.Module):
    """Stands in for SAM's image encoder inside :func:`sam_prompting`'s ``Sam``: ``postprocess_masks`` and the prompt
    transforms read only its ``img_size`` (the encoder itself is Trident's, held once)."""

    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size


def sam_prompting(img_size: int, weights: str | None) -> torch.nn.Module:
    """A ``segment_anything`` ``Sam`` as ``build_sam.py`` builds it but for its image encoder (:class:`_ImageSide`):
    the prompt encoder and mask decoder, in float (``trident.py`` ``__init__``), with the ``prompt_encoder.*`` /
    ``mask_decoder.*`` tensors of the SAM checkpoint ``weights`` (the one whose image encoder Trident reads), or
    random (None: tests)."""
    from pathlib import Path

    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, side = 256, img_size // 16
    sam = Sam(image_encoder=_ImageSide(img_size),
              prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(side, side),
                                           input_image_size=(img_size, img_size), mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                       transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048,
                                                                     num_heads=8),
                                       transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=256))
    if weights is not None:
        from ovseg.utils.io import load_weights_file

        state = load_weights_file(Path(weights).expanduser(), "SAM weights file", allow_numpy=True)
        state = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
        missing, unexpected = sam.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("pixel_")]
        if missing or unexpected:
            raise ValueError(f"{weights}: no SAM prompt encoder / mask decoder (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    return sam.float().requires_grad_(False).eval()
