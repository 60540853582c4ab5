"""Where CLIP-S4's unknown prototypes go, measured against ground truth (a diagnostic: labels are read here only).

For a trained (or frozen) :class:`~ovseg.methods.clips4.CLIPS4` and labelled images, each image is cut into the
model's training segments (its k-means clusters, cut by the over-segmentation regions when the model trains with
them) and each segment gets CLIP's target under the model's ``unknown_targets`` rule, with the bank and calibration
as they stand. With the majority ground-truth class of each segment:

- ``held_out_to_unknown`` / ``known_to_unknown``: the share of segments of held-out (unnamed) classes and of known
  classes whose CLIP target is an unknown prototype — what the rule is for: the first high, the second low;
- ``bank_held_out``: the share of held-out-class segments among those the rule feeds to the bank (chance = the
  held-out share of all segments, ``held_out_share``; None without a bank).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F

from ovseg.models.segments import cut_by_regions, segment_mean, segment_pixels
from ovseg.methods.clips4.views import over_segment, warp_labels_to_view

__all__ = ["unknown_target_shares"]

IDENTITY = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])


@torch.no_grad()
def unknown_target_shares(model: Any, samples: Iterable[dict], class_names: list[str], crop_size: int,
                          regions: str = "slic", region_count: int = 24, region_compactness: float = 10.0,
                          region_scale: float = 100.0, ignore_index: int = 255) -> dict[str, Any]:
    """``samples``: dicts with ``image`` uint8 ``[3, H, W]`` and ``label`` ``[H, W]`` (indices into ``class_names``).
    The whole image is one view (resized to ``crop_size``); the teacher sees it at its own size. Returns the shares
    above and the segment counts behind them."""
    hp = model.hparams
    known_names = set(model.known_names)
    held_out = torch.tensor([name not in known_names for name in class_names])
    counts = {"held_out": 0, "known": 0, "held_out_to_unknown": 0, "known_to_unknown": 0, "fed": 0, "fed_held_out": 0}
    for sample in samples:
        image = sample["image"]
        label = sample["label"].long()
        view = F.interpolate(image[None].float() / 255, size=(crop_size, crop_size), mode="bilinear",
                             align_corners=False)
        z = model.embed(view.to(model.device))  # [1, D, h, w]
        height, width, dim = z.shape[-2], z.shape[-1], z.shape[1]
        zf = z.flatten(2).transpose(1, 2)
        clusters = segment_pixels(zf, height, width, min(hp.num_segments, height * width), hp.kmeans_iterations,
                                  hp.segments, hp.location_weight)
        region = None
        if hp.region_cut and regions != "none":
            labels = over_segment(image.permute(1, 2, 0).numpy(), regions, region_count, region_compactness,
                                  region_scale)
            region = warp_labels_to_view(torch.from_numpy(labels), IDENTITY, (height, width)).flatten(1)
        index, _, _ = cut_by_regions(clusters, region.to(clusters.device) if region is not None else None)
        count = int(index.max()) + 1
        teacher = model.teacher_features([image])[0]
        warped = F.normalize(F.interpolate(teacher[None], size=(height, width), mode="bilinear",
                                           align_corners=False), dim=1).flatten(2).transpose(1, 2)
        clip_segments = segment_mean(warped.reshape(1, -1, dim), index.reshape(1, -1), count)[0]
        grid_label = warp_labels_to_view(label, IDENTITY, (height, width)).flatten().to(index.device)
        keep = grid_label != ignore_index
        votes = torch.zeros(count, len(class_names), device=index.device)
        votes.index_put_((index.flatten()[keep], grid_label[keep]), torch.ones(int(keep.sum()), device=index.device),
                         accumulate=True)
        labelled = votes.sum(1) > 0
        majority_held_out = held_out.to(index.device)[votes.argmax(1)]
        segment_held_out, segment_known = majority_held_out & labelled, ~majority_held_out & labelled
        to_unknown = model.semantic_targets(clip_segments)["to_unknown"]
        fed = model.unknown.feeds(clip_segments, model.known_text) & labelled
        counts["held_out"] += int(segment_held_out.sum())
        counts["known"] += int(segment_known.sum())
        counts["held_out_to_unknown"] += int((segment_held_out & to_unknown).sum())
        counts["known_to_unknown"] += int((segment_known & to_unknown).sum())
        counts["fed"] += int(fed.sum())
        counts["fed_held_out"] += int((fed & segment_held_out).sum())

    def share(part: int, whole: int) -> float | None:
        return round(part / whole, 4) if whole else None

    return {"held_out_to_unknown": share(counts["held_out_to_unknown"], counts["held_out"]),
            "known_to_unknown": share(counts["known_to_unknown"], counts["known"]),
            "bank_held_out": share(counts["fed_held_out"], counts["fed"]) if model.unknown.num else None,
            "held_out_share": share(counts["held_out"], counts["held_out"] + counts["known"]),
            "bank_ready": bool(model.unknown.initialized), "counts": counts}
