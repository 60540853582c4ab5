"""Protocol resize, whole / sliding-window inference, and memory-bounded logits -> labels.

``DenseFn`` is a method's ``dense_logits`` with its text embeddings bound: images ``[B,3,h,w]`` in
[0,1] -> scores ``[B,Q,h',w']`` (one channel per query name).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.utils.geometry import keep_ratio_size


DenseFn = Callable[[torch.Tensor], torch.Tensor]


# -- resize ---------------------------------------------------------------------------------------


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """``[3,H,W]`` in [0,1] -> ``[H,W,3]`` uint8. Exact for images decoded from 8-bit files (k/255 -> k)."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def from_uint8_hwc(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    array = np.require(array, requirements=("C", "W"))  # PIL's arrays are read-only: torch warns on those
    return torch.from_numpy(array).permute(2, 0, 1).to(like.device, like.dtype) / 255.0


def resize_image(image: torch.Tensor, size: tuple[int, int], library: str = "torch") -> torch.Tensor:
    """Bilinear resize of ``[B,3,H,W]`` in [0,1] to ``size = (h, w)``.

    ``torch``: ``F.interpolate`` on floats (no antialias, as cv2 INTER_LINEAR). ``cv2``: mmcv ``imresize`` —
    ``cv2.resize(INTER_LINEAR)`` on the uint8 image, as mmseg pipelines do. ``pil``: detectron2
    ``ResizeTransform`` — ``PIL.Image.resize(BILINEAR)`` on the uint8 image (antialiased when shrinking).
    The libraries themselves are called, so their rounding is theirs.
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if library == "torch":
        return F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    height, width = size
    out = []
    for single in image:
        array = to_uint8_hwc(single)
        if library == "cv2":
            import cv2

            resized = cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)
        elif library == "pil":
            from PIL import Image

            resized = np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))
        else:
            raise ValueError(f"resize library must be 'torch', 'cv2' or 'pil', got {library!r}")
        out.append(from_uint8_hwc(resized, image))
    return torch.stack(out)


def protocol_resize(
    image: torch.Tensor,
    short_side: int | None,
    long_side_max: int | None,
    square: int | None,
    library: str = "torch",
    rule: str = "mmcv",
) -> torch.Tensor:
    """The protocol's keep-ratio resize (by ``library`` and size ``rule``), then an optional square resize on
    floats (PixelCLIP's ``F.interpolate`` to the CLIP input)."""
    h, w = image.shape[-2:]
    image = resize_image(image, keep_ratio_size(h, w, short_side, long_side_max, rule), library)
    if square:
        image = resize_image(image, (square, square))
    return image


def center_crop_view(image: torch.Tensor, label: torch.Tensor | None, side: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIPtrase's evaluation view (``clip_self_correlation.py`` ``_transform1`` / ``gt_transform``): the image
    ``[3,H,W]`` in [0,1] resized so its short side is ``side`` (torchvision ``Resize(side)``: the long side
    ``int(side * long / short)``, PIL BICUBIC on the uint8 image) and the label ``[H,W]`` the same way with PIL
    NEAREST, then the centre ``side`` x ``side`` square of both (torchvision ``CenterCrop``: offsets
    ``int(round((H - side) / 2))``)."""
    from PIL import Image

    height, width = image.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(side * long / short)
    new_h, new_w = (side, new_long) if height <= width else (new_long, side)
    top, left = int(round((new_h - side) / 2.0)), int(round((new_w - side) / 2.0))
    resized = np.asarray(Image.fromarray(to_uint8_hwc(image)).resize((new_w, new_h), Image.BICUBIC))
    view = from_uint8_hwc(resized[top:top + side, left:left + side], image)
    if label is None:
        return view, None
    ids = Image.fromarray(label.cpu().numpy().astype(np.int32)).resize((new_w, new_h), Image.NEAREST)
    cropped = np.asarray(ids)[top:top + side, left:left + side]
    return view, torch.from_numpy(cropped.copy()).to(label.device, label.dtype)


# -- inference ------------------------------------------------------------------------------------
def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg ``slide_inference`` grid: ``(y1, y2, x1, x2)`` windows of ``crop`` (or the whole side when
    the image is smaller), the last one pulled back to end at the border."""
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * stride + crop, height)
            x2 = min(wi * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


def slide_logits(
    dense_fn: DenseFn,
    image: torch.Tensor,
    crop: int,
    stride: int,
    window_batch_size: int = 8,
    accumulate_device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[1,3,h,w]`` -> ``[Q,h,w]``: window scores upsampled to the window, summed, divided by the
    number of windows covering each pixel. Windows of one image all have the same size, so they
    run ``window_batch_size`` at a time."""
    _, _, height, width = image.shape
    windows = slide_windows(height, width, crop, stride)
    device = accumulate_device or image.device
    total = None
    count = torch.zeros(1, height, width, device=device)
    for start in range(0, len(windows), window_batch_size):
        group = windows[start : start + window_batch_size]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group])
        scores = dense_fn(crops)
        scores = F.interpolate(scores.float(), size=crops.shape[-2:], mode="bilinear", align_corners=False)
        scores = scores.to(device)
        if total is None:
            total = torch.zeros(scores.shape[1], height, width, device=device)
        for (y1, y2, x1, x2), window_scores in zip(group, scores):
            total[:, y1:y2, x1:x2] += window_scores
            count[:, y1:y2, x1:x2] += 1
    assert bool((count > 0).all()), "slide windows must cover every pixel"
    return total / count


# -- scores -> labels -----------------------------------------------------------------------------
def labels_from_logits(
    logits: torch.Tensor,
    out_size: tuple[int, int],
    query_to_class: torch.Tensor,
    *,
    logit_scale: float | None = None,
    prob_threshold: float | None = None,
    area_threshold: float | None = None,
    background_index: int | None = None,
    via_size: tuple[int, int] | None = None,
    refine: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_chunk_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """``[Q,h,w]`` query scores -> ``[H,W]`` class ids at the label size.

    ``via_size``: upsample to this size first, then to ``out_size`` (mmseg's whole inference resizes scores to
    the resized image, then to the original; each step bilinear, per channel, so chunking stays exact).
    ``refine``: applied to the upsampled scores ``[1,q,H,W]`` of each chunk before the logit scale (post-processing
    that treats every channel on its own, such as :class:`~ovseg.eval.pamr.PAMR`).

    Equivalent to: bilinear upsampling of all scores to ``out_size``, ``softmax(scale · s)`` over
    queries, max over each class's synonyms, SCLIP's area rule, argmax, and the probability
    threshold — but upsampled ``max_chunk_bytes`` worth of channels at a time, so 171 classes at
    2048×1024 never exist as one full-resolution float tensor. Bilinear upsampling is per-channel
    and softmax is monotonic, so the chunked running max/argmax and log-sum-exp are exact.
    """
    if (prob_threshold is not None or area_threshold is not None) and background_index is None:
        raise ValueError("prob_threshold/area_threshold need a dataset with a background class")
    if (prob_threshold is not None or area_threshold is not None) and logit_scale is None:
        raise ValueError("prob_threshold/area_threshold need a logit_scale")
    num_queries = logits.shape[0]
    num_classes = int(query_to_class.max()) + 1  # read before the move: the vocabulary's map lives on the CPU
    query_to_class = query_to_class.to(logits.device, non_blocking=True)
    height, width = out_size
    largest = max(height * width, via_size[0] * via_size[1] if via_size else 0)
    # refinement holds a few copies of its chunk (padded input, output, one shifted view)
    chunk = max(1, min(num_queries, max_chunk_bytes // (largest * 4 * (4 if refine is not None else 1))))

    def best_query(allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        best_value = torch.full((height, width), -math.inf, device=logits.device)
        best = torch.zeros((height, width), dtype=torch.long, device=logits.device)
        log_norm = torch.full((height, width), -math.inf, device=logits.device) if logit_scale else None
        for q0 in range(0, num_queries, chunk):
            up = logits[None, q0 : q0 + chunk].float()
            if via_size is not None and tuple(via_size) != tuple(up.shape[-2:]):
                up = F.interpolate(up, size=via_size, mode="bilinear", align_corners=False)
            up = F.interpolate(up, size=out_size, mode="bilinear", align_corners=False)
            if refine is not None:
                up = refine(up)
            up = up[0]
            if logit_scale:
                up.mul_(logit_scale)
                log_norm = torch.logaddexp(log_norm, torch.logsumexp(up, dim=0))
            if allowed is not None:
                up[~allowed[q0 : q0 + chunk]] = -math.inf
            value, index = up.max(dim=0)
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best = torch.where(better, index + q0, best)
        return best, best_value, log_norm

    best, best_value, log_norm = best_query(None)
    pred = query_to_class[best]
    if area_threshold is not None:
        area = torch.bincount(pred.flatten(), minlength=num_classes).float()
        area[background_index] = 0
        keep = area > area_threshold * area.sum()
        keep[background_index] = True
        if not bool(keep.all()):  # SCLIP's area rule only: one read-back per image decides on a second pass
            best, best_value, log_norm = best_query(keep[query_to_class])
            pred = query_to_class[best]
    if prob_threshold is not None:
        top_prob = torch.exp(best_value - log_norm)
        pred = torch.where(top_prob < prob_threshold, torch.full_like(pred, background_index), pred)
    return pred


def class_probabilities(logits: torch.Tensor, out_size: tuple[int, int], query_to_class: torch.Tensor,
                        logit_scale: float | None, via_size: tuple[int, int] | None = None) -> torch.Tensor:
    """``[Q,h,w]`` query scores -> ``[C,H,W]`` class probabilities at the label size: upsampled as
    :func:`labels_from_logits` does, ``softmax(scale · s)`` over queries, max over each class's queries (whole,
    not chunked: for post-processing that reads them all, such as Trident's SAM refinement)."""
    up = logits[None].float()
    if via_size is not None and tuple(via_size) != tuple(up.shape[-2:]):
        up = F.interpolate(up, size=via_size, mode="bilinear", align_corners=False)
    up = F.interpolate(up, size=out_size, mode="bilinear", align_corners=False)[0]
    probs = (up * (logit_scale or 1.0)).softmax(0)
    index = query_to_class.to(probs.device)
    out = probs.new_zeros((int(index.max()) + 1, *out_size))
    return out.index_reduce_(0, index, probs, "amax", include_self=False)


def close_labels(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Morphological closing of a label map ``[H,W]`` with a ``size``-sided square: each pixel takes the largest
    class id of its window (dilation), then the smallest of that result's windows (erosion); pixels beyond the
    border take no part (ITACLIP ``itaclip_segmentor.py`` ``postprocess_result``: ``cv2.morphologyEx(MORPH_CLOSE)``
    with a 3x3 ``MORPH_RECT`` on the ids as uint8, whose default border is neutral for both steps). The ids stay
    as they are here, where the reference's uint8 cast wraps ids above 255."""
    if size % 2 != 1:
        raise ValueError(f"label closing needs an odd kernel side, got {size}")
    ids = labels[None, None].double()  # exact for any id; max pooling pads with -inf, neutral for both steps
    dilated = F.max_pool2d(ids, size, stride=1, padding=size // 2)
    eroded = -F.max_pool2d(-dilated, size, stride=1, padding=size // 2)
    return eroded[0, 0].to(labels.dtype)


def labels_from_masks(
    logits: torch.Tensor,
    out_size: tuple[int, int],
    query_to_class: torch.Tensor,
    masks: torch.Tensor,
    *,
    via_size: tuple[int, int] | None = None,
    max_chunk_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """Zero-shot mask classification: ``[Q,h,w]`` query scores and an ``[H,W]`` mask-id map (a ground-truth label
    map: each value one mask) -> ``[H,W]`` class ids, every pixel of a mask taking the mask's class.

    A mask's class is the argmax over classes of the max over each class's synonyms of the query scores averaged
    over the mask's pixels (after the same bilinear upsampling as :func:`labels_from_logits`). For cosine scores
    the average is the cosine with the mask-pooled L2-normalised feature up to a positive factor, so the argmax is
    that of mask-pooled features. Upsampling runs ``max_chunk_bytes`` of channels at a time (exact: per channel).
    """
    num_queries = logits.shape[0]
    num_classes = int(query_to_class.max()) + 1
    height, width = out_size
    if tuple(masks.shape[-2:]) != (height, width):
        raise ValueError(f"mask map {tuple(masks.shape[-2:])} and output size {tuple(out_size)} differ")
    # pool over the mask ids present only: ids are sparse where labels are 16-bit (65535 = ignore, ADE-847)
    present, ids = torch.unique(masks.to(logits.device).long().flatten(), return_inverse=True)
    num_ids = present.numel()
    largest = max(height * width, via_size[0] * via_size[1] if via_size else 0)
    chunk = max(1, min(num_queries, max_chunk_bytes // (largest * 4)))
    pooled = torch.zeros(num_ids, num_queries, dtype=torch.float64, device=logits.device)
    for q0 in range(0, num_queries, chunk):
        up = logits[None, q0 : q0 + chunk].float()
        if via_size is not None and tuple(via_size) != tuple(up.shape[-2:]):
            up = F.interpolate(up, size=via_size, mode="bilinear", align_corners=False)
        up = F.interpolate(up, size=out_size, mode="bilinear", align_corners=False)[0]
        pooled[:, q0 : q0 + up.shape[0]].index_add_(0, ids, up.flatten(1).T.double())
    pooled /= torch.bincount(ids, minlength=num_ids).clamp(min=1)[:, None]
    per_class = torch.full((num_ids, num_classes), -math.inf, dtype=pooled.dtype, device=pooled.device)
    per_class = per_class.scatter_reduce(1, query_to_class.to(pooled.device).expand(num_ids, -1), pooled, "amax")
    return per_class.argmax(dim=1)[ids].reshape(height, width)
