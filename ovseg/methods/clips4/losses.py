"""CLIP-S4's three losses (spec steps 4, 6 and 8). Inputs are L2-normalised embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pixel_segment_infonce", "embedding_consistency", "semantic_consistency"]

_NEG_INF = -1e4  # masked logits (finite so fully masked rows stay finite)


def pixel_segment_infonce(
    pixels: Tensor,
    prototypes: Tensor,
    positive: Tensor,
    valid_prototypes: Tensor | None = None,
    exclude: Tensor | None = None,
    temperature: float = 0.1,
) -> Tensor:
    """InfoNCE of pixels against segment prototypes (SegSort/HSG style).

    Args:
        pixels: ``[P, D]`` pixel embeddings.
        prototypes: ``[S, D]`` all segment prototypes (both views, all images, all processes).
        positive: ``[P]`` index of each pixel's positive prototype in ``prototypes``.
        valid_prototypes: ``[S]`` bool; empty segments are not negatives.
        exclude: ``[P]`` index of one more prototype to leave out of each pixel's negatives (the pixel's
            own segment in its own view), or None.
        temperature: τ_pix.
    Returns the mean loss over pixels (0 with a graph when there are none).
    """
    if pixels.shape[0] == 0:
        return pixels.sum() * 0.0 + prototypes.sum() * 0.0
    logits = pixels @ prototypes.t() / temperature  # [P, S]
    mask = torch.zeros_like(logits, dtype=torch.bool)
    if valid_prototypes is not None:
        mask |= ~valid_prototypes[None, :]
    if exclude is not None:
        mask.scatter_(1, exclude[:, None], True)
    mask.scatter_(1, positive[:, None], False)  # the positive is never masked
    logits = logits.masked_fill(mask, _NEG_INF)
    return F.cross_entropy(logits, positive)


def embedding_consistency(
    model_segments: Tensor,
    clip_segments: Tensor,
    positive: Tensor,
    valid: Tensor | None = None,
    mode: str = "infonce",
    temperature: float = 0.1,
) -> Tensor:
    """Model segment embeddings must match CLIP's pooled over the same segments.

    Args:
        model_segments: ``[S, D]`` (this process's segments).
        clip_segments: ``[S_all, D]`` CLIP segment embeddings of all segments in the batch (detached).
        positive: ``[S]`` index of each model segment's own CLIP embedding in ``clip_segments``.
        valid: ``[S_all]`` bool: non-empty segments (the rows of ``model_segments`` are
            ``valid[positive]``).
        mode: ``infonce`` (segment-level InfoNCE, other segments' CLIP embeddings as negatives) or
            ``cosine`` (1 - cos with the own CLIP embedding).
    """
    clip_segments = clip_segments.detach()
    keep = torch.ones_like(positive, dtype=torch.bool) if valid is None else valid[positive]
    if not keep.any():
        return model_segments.sum() * 0.0
    model_segments, positive = model_segments[keep], positive[keep]
    if mode == "cosine":
        return (1 - (model_segments * clip_segments[positive]).sum(-1)).mean()
    if mode != "infonce":
        raise ValueError(f"embedding_loss must be 'infonce' or 'cosine', got {mode!r}")
    logits = model_segments @ clip_segments.t() / temperature
    if valid is not None:
        logits = logits.masked_fill(~valid[None, :], _NEG_INF)
    return F.cross_entropy(logits, positive)


def semantic_consistency(
    model_segments: Tensor, clip_segments: Tensor, targets: Tensor, temperature: float = 0.01,
    valid: Tensor | None = None,
) -> Tensor:
    """KL(p_CLIP ‖ p_model) over the target classes, averaged over segments.

    ``p = softmax(cos(segment, targets) / τ_s)``; CLIP's side is a detached teacher.
    """
    if valid is not None:
        model_segments, clip_segments = model_segments[valid], clip_segments[valid]
    if model_segments.shape[0] == 0 or targets.shape[0] == 0:
        return model_segments.sum() * 0.0
    targets = targets.detach()
    log_p_clip = F.log_softmax(clip_segments.detach() @ targets.t() / temperature, dim=-1)
    log_p_model = F.log_softmax(model_segments @ targets.t() / temperature, dim=-1)
    return F.kl_div(log_p_model, log_p_clip, log_target=True, reduction="batchmean")
