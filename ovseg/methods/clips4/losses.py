"""CLIP-S4's three losses (spec steps 4, 6 and 8). Inputs are L2-normalised embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pixel_segment_infonce", "pixel_segment_multi_positive", "pixel_segment_segsort_plus",
           "embedding_consistency", "semantic_consistency", "reduce"]

_NEG_INF = -1e4  # masked logits (finite so fully masked rows stay finite)


def reduce(losses: Tensor, reduction: str) -> Tensor:
    """``mean`` (0 with a graph when empty) or ``none`` (the per-item losses)."""
    if reduction == "none":
        return losses
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return losses.mean() if losses.numel() else losses.sum() * 0.0


def pixel_segment_infonce(
    pixels: Tensor,
    prototypes: Tensor,
    positive: Tensor,
    valid_prototypes: Tensor | None = None,
    exclude: Tensor | None = None,
    temperature: float = 0.1,
    reduction: str = "mean",
) -> Tensor:
    """InfoNCE of pixels against segment prototypes, one positive each (``pixel_loss: infonce``).

    Args:
        pixels: ``[P, D]`` pixel embeddings.
        prototypes: ``[S, D]`` all segment prototypes (both views, all images, all processes).
        positive: ``[P]`` index of each pixel's positive prototype in ``prototypes``.
        valid_prototypes: ``[S]`` bool; empty segments are not negatives.
        exclude: ``[P]`` index of one more prototype to leave out of each pixel's negatives (the pixel's
            own segment in its own view), or None.
        temperature: τ_pix.
        reduction: ``mean`` or ``none``.

    Returns the mean loss over pixels (0 with a graph when there are none), or per pixel (``reduction="none"``).
    """
    if pixels.shape[0] == 0:
        return reduce(pixels.sum(-1) * 0.0 + prototypes.sum() * 0.0, reduction)
    logits = pixels @ prototypes.t() / temperature  # [P, S]
    mask = torch.zeros_like(logits, dtype=torch.bool)
    if valid_prototypes is not None:
        mask |= ~valid_prototypes[None, :]
    if exclude is not None:
        mask.scatter_(1, exclude[:, None], True)
    mask.scatter_(1, positive[:, None], False)  # the positive is never masked
    logits = logits.masked_fill(mask, _NEG_INF)
    return reduce(F.cross_entropy(logits, positive, reduction="none"), reduction)


def pixel_segment_multi_positive(
    pixels: Tensor,
    prototypes: Tensor,
    positives: Tensor,
    valid_prototypes: Tensor | None = None,
    concentration: float = 16.0,
    reduction: str = "mean",
) -> Tensor:
    """SegSort's multi-positive pixel-segment loss (``pixel_loss: segsort_multi_positive``):
    ``L(p) = −log Σ_{s∈S+} exp(κ·cos(p, s)) / Σ_{s∈S+∪S−} exp(κ·cos(p, s))``.

    Args:
        pixels: ``[P, D]`` pixel embeddings.
        prototypes: ``[S, D]`` all segment prototypes (both views, all images, all processes).
        positives: ``[P, M]`` indices into ``prototypes`` of each pixel's positive set S+ (−1: unused slot).
        valid_prototypes: ``[S]`` bool; empty segments are left out of the sums.
        concentration: κ (HSG: 16, i.e. τ = 1/16).
        reduction: ``mean`` or ``none``.

    Every other valid prototype is in S−. Returns the mean over pixels, or per pixel (``reduction="none"``).
    """
    if pixels.shape[0] == 0:
        return reduce(pixels.sum(-1) * 0.0 + prototypes.sum() * 0.0, reduction)
    logits = concentration * (pixels @ prototypes.t())  # [P, S]
    if valid_prototypes is not None:
        logits = logits.masked_fill(~valid_prototypes[None, :], _NEG_INF)
    used = positives >= 0
    positive_logits = torch.gather(logits, 1, positives.clamp_min(0)).masked_fill(~used, _NEG_INF)
    return reduce(torch.logsumexp(logits, dim=1) - torch.logsumexp(positive_logits, dim=1), reduction)


def pixel_segment_segsort_plus(
    pixels: Tensor,
    prototypes: Tensor,
    own: Tensor,
    groups: Tensor,
    valid_prototypes: Tensor | None = None,
    concentration: float = 16.0,
    reduction: str = "mean",
    group_mode: str = "segsort+",
) -> Tensor:
    """HSG's ``segsort+`` pixel-segment loss (``hsg/utils/segsort/loss.py``, ``pixel_loss: segsort_plus``): a pixel's
    positives are the *other* segments of its group (its visually coherent region, in both views); its own segment
    counts only when the group has no other segment, and is then the only positive. Segments of other groups are
    the negatives; the own segment, when left out of the positives, is left out of the sum as well:
    ``L(p) = −log Σ_{S+} exp(κ cos) / (Σ_{S+} exp(κ cos) + Σ_{S−} exp(κ cos))``.

    ``group_mode="segsort"`` is SegSort's rule (the same file's other ``group_mode``; ``pixel_loss: segsort``): the
    own segment is the only positive, the other segments of its group are left out of both sums.

    Args:
        pixels: ``[P, D]`` pixel embeddings.
        prototypes: ``[S, D]`` all segment prototypes (both views, all images, all processes).
        own: ``[P]`` index of each pixel's own segment in ``prototypes``.
        groups: ``[S]`` group (region) id of each segment; a pixel's group is its own segment's.
        valid_prototypes: ``[S]`` bool; empty segments are left out of the sums.
        concentration: κ (HSG: 16).
        reduction: ``mean`` or ``none``.
        group_mode: ``segsort+`` (HSG) or ``segsort`` (SegSort).
    """
    if group_mode not in ("segsort+", "segsort"):
        raise ValueError(f"group_mode must be 'segsort+' or 'segsort', got {group_mode!r}")
    if pixels.shape[0] == 0:
        return reduce(pixels.sum(-1) * 0.0 + prototypes.sum() * 0.0, reduction)
    logits = concentration * (pixels @ prototypes.t())  # [P, S]
    valid = torch.ones_like(groups, dtype=torch.bool) if valid_prototypes is None else valid_prototypes
    same = (groups[None, :] == groups[own][:, None]) & valid[None, :]
    is_own = torch.zeros_like(same).scatter_(1, own[:, None], True)
    others = same & ~is_own
    if group_mode == "segsort":
        positive = is_own
    else:
        positive = torch.where(others.any(dim=1, keepdim=True), others, is_own)
    counted = positive | (~same & valid[None, :])
    return reduce(torch.logsumexp(logits.masked_fill(~counted, _NEG_INF), dim=1)
                  - torch.logsumexp(logits.masked_fill(~positive, _NEG_INF), dim=1), reduction)


def embedding_consistency(
    model_segments: Tensor,
    clip_segments: Tensor,
    positive: Tensor,
    valid: Tensor | None = None,
    mode: str = "infonce",
    temperature: float = 0.1,
    reduction: str = "mean",
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
        temperature: τ_emb of ``infonce``.
        reduction: ``mean`` or ``none``.
    """
    clip_segments = clip_segments.detach()
    keep = torch.ones_like(positive, dtype=torch.bool) if valid is None else valid[positive]
    if mode not in ("infonce", "cosine"):
        raise ValueError(f"embedding_loss must be 'infonce' or 'cosine', got {mode!r}")
    model_segments, positive = model_segments[keep], positive[keep]
    if not len(positive):
        return reduce(model_segments.sum(-1) * 0.0, reduction)
    if mode == "cosine":
        return reduce(1 - (model_segments * clip_segments[positive]).sum(-1), reduction)
    logits = model_segments @ clip_segments.t() / temperature
    if valid is not None:
        logits = logits.masked_fill(~valid[None, :], _NEG_INF)
    return reduce(F.cross_entropy(logits, positive, reduction="none"), reduction)


def semantic_consistency(
    model_segments: Tensor, clip_segments: Tensor, targets: Tensor, temperature: float = 0.01,
    valid: Tensor | None = None, allowed: Tensor | None = None, reduction: str = "mean", bias: Tensor | None = None,
) -> Tensor:
    """KL(p_CLIP ‖ p_model) over the target classes, averaged over segments.

    ``p = softmax((cos(segment, targets) + bias) / τ_s)``; CLIP's side is a detached teacher. ``allowed`` ``[S, T]``
    bool restricts each segment's softmaxes to some targets (the unknown-prototype gate); ``bias`` ``[T]`` shifts
    each target's cosines (the calibration across the image–text gap).
    """
    if valid is not None:
        model_segments, clip_segments = model_segments[valid], clip_segments[valid]
        allowed = allowed[valid] if allowed is not None else None
    if model_segments.shape[0] == 0 or targets.shape[0] == 0:
        return reduce(model_segments.sum(-1) * 0.0, reduction)
    targets = targets.detach()
    bias = torch.zeros(targets.shape[0], device=targets.device) if bias is None else bias.detach()
    clip_logits = (clip_segments.detach() @ targets.t() + bias) / temperature
    model_logits = (model_segments @ targets.t() + bias) / temperature
    if allowed is not None:
        clip_logits, model_logits = clip_logits.masked_fill(~allowed, _NEG_INF), model_logits.masked_fill(~allowed,
                                                                                                          _NEG_INF)
    log_p_clip, log_p_model = F.log_softmax(clip_logits, dim=-1), F.log_softmax(model_logits, dim=-1)
    per_segment = F.kl_div(log_p_model, log_p_clip, log_target=True, reduction="none").sum(-1)
    return reduce(per_segment, reduction)
