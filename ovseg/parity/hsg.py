"""HSG (twke18/HSG, the SegSort authors' re-implementation of SegSort's pieces, ``hsg/utils/segsort/``) beside the
segments and pixel losses that CLIP-S4 and the SegSort baseline train with (:mod:`ovseg.models.segments`,
:func:`ovseg.methods.clips4.losses.pixel_segment_segsort_plus`):

- segments: the steps of their ``segment_by_kmeans`` for one image, each their function in their order
  (``normalize_embedding``; ``generate_location_features(feature_type='float') - 0.5`` appended; re-normalised;
  ``initialize_cluster_labels`` relabelled by ``torch.unique``; ``kmeans_with_initial_labels``) — the function itself
  cannot run on a CPU (it offsets batch ids by ``device.index``, None there) — against ovseg's
  :func:`~ovseg.models.segments.segment_pixels` (``segments: segsort``), on the same random embeddings: the share of
  pixels whose segment is the same (ids matched by overlap; both start from the same grid, so the partitions are
  compared, not the numbering);
- pixel loss: their ``SegSortLoss`` with ``group_mode='segsort+'`` (CLIP-S4, ``pixel_loss: segsort_plus``) and
  ``'segsort'`` (the SegSort baseline, ``pixel_loss: segsort``) against ovseg's per-pixel losses, ≤ 1e-5.

SegSort's own repository (jyhjinghwang/SegSort, TensorFlow) is the origin of both files ("borrowed and
re-implemented from ..."), but it could not be fetched here; HSG's PyTorch port is what is imported.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.parity.common import ParityRecord, label_record, reference_imports, tensor_record

PROTOCOLS: tuple[str, ...] = ()  # training pieces, under no evaluation protocol
#: (height, width, grid rows, grid columns, iterations): the k-NN probe's 6x6 / 20 and the training's 4x4 / 15 on
#: stride-8 grids of VOC-like crops
SEGMENT_CASES = ((41, 41, 6, 6, 20), (42, 63, 6, 6, 20), (64, 64, 4, 4, 15), (47, 29, 4, 4, 15))


def smooth_embeddings(height: int, width: int, dim: int, seed: int) -> torch.Tensor:
    """``[1, dim, H, W]`` embeddings with region structure (a few smooth blobs plus noise), so k-means has clusters
    to find and ties are rare."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, dim, max(2, height // 8), max(2, width // 8), generator=generator)
    x = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return x + 0.3 * torch.randn(1, dim, height, width, generator=generator)


def matched_share(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Our segment ids renamed to the reference id each overlaps most (the partitions are compared)."""
    renamed = np.empty_like(ours)
    for segment in np.unique(ours):
        inside = ours == segment
        renamed[inside] = np.bincount(theirs[inside]).argmax()
    return renamed


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), **kwargs) -> list[ParityRecord]:
    from ovseg.methods.clips4.losses import pixel_segment_segsort_plus
    from ovseg.models.segments import segment_pixels

    started = time.time()
    records = []
    with reference_imports(ref_dir):
        common = importlib.import_module("hsg.utils.segsort.common")
        general = importlib.import_module("hsg.utils.general.common")
        loss = importlib.import_module("hsg.utils.segsort.loss")

        def their_segments(embeddings: torch.Tensor, rows: int, cols: int, iterations: int) -> torch.Tensor:
            _, dim, height, width = embeddings.shape
            points = general.normalize_embedding(embeddings[0].permute(1, 2, 0).reshape(-1, dim))
            location = common.generate_location_features((height, width), embeddings.device, "float") - 0.5
            points = general.normalize_embedding(torch.cat([points, location.reshape(-1, 2)], -1))
            start = common.initialize_cluster_labels([rows, cols], (height, width), embeddings.device).reshape(-1)
            _, start = torch.unique(start, return_inverse=True)
            return common.kmeans_with_initial_labels(points, start, int(start.max()) + 1, iterations)

        for height, width, rows, cols, iterations in SEGMENT_CASES:
            embeddings = smooth_embeddings(height, width, 32, seed=height * width).to(device)
            with torch.no_grad():
                theirs = their_segments(embeddings, rows, cols, iterations)
                flat = embeddings.flatten(2).transpose(1, 2)
                ours = segment_pixels(flat, height, width, rows * cols, iterations, "segsort", 1.0)[0]
            ours_np, theirs_np = ours.cpu().numpy(), theirs.cpu().numpy()
            records.append(label_record(
                "HSG", f"segments {height}x{width} grid {rows}x{cols}, {iterations} iterations",
                matched_share(ours_np, theirs_np), theirs_np,
                detail=f"segment_by_kmeans' steps vs segment_pixels(segments='segsort', location_weight=1); 32-d "
                       f"smooth random embeddings; {len(np.unique(theirs_np))} / {len(np.unique(ours_np))} segments "
                       "(theirs / ours)"))

        generator = torch.Generator().manual_seed(0)
        # float64: their segsort+ subtracts the own segment's exp(16 cos) from the group's sum in exp space, which
        # in fp32 loses up to ~3e-3 of the loss to cancellation (ovseg works in log space); fp64 compares the rules
        pixels = F.normalize(torch.randn(600, 32, generator=generator), dim=-1).to(device, torch.float64)
        prototypes = F.normalize(torch.randn(48, 32, generator=generator), dim=-1).to(device, torch.float64)
        groups = torch.randint(0, 12, (48,), generator=generator).to(device)
        groups[-3:] = torch.tensor([40, 41, 42], device=device)  # groups of one segment: the own-segment fallback
        own = torch.randint(0, 48, (600,), generator=generator).to(device)
        for mode, pixel_loss in (("segsort+", "segsort_plus"), ("segsort", "segsort")):
            reference = loss.SegSortLoss(16.0, group_mode=mode, reduction="none")
            with torch.no_grad():
                theirs = reference(pixels, groups[own], own, prototypes, groups).view(-1)
                ours = pixel_segment_segsort_plus(pixels, prototypes, own, groups, None, 16.0, reduction="none",
                                                  group_mode=mode)
            records.append(tensor_record(
                "HSG", f"pixel loss group_mode={mode}", ours, theirs,
                detail=f"SegSortLoss(16, group_mode={mode!r}) per pixel vs pixel_segment_segsort_plus "
                       f"(pixel_loss: {pixel_loss}); 600 pixels, 48 prototypes in 15 groups, fp64"))
    print(f"[HSG] compared in {time.time() - started:.0f} s", flush=True)
    return records
