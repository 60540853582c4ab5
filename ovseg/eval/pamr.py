"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, "Single-Stage Semantic Segmentation from Image Labels",
CVPR 2020), the post-processing of NACLIP's released numbers (``naclip.py`` ``NACLIP.predict``, ``pamr.py``).

Each pixel's scores become an affinity-weighted average of its 8 neighbours at each dilation, repeated ``steps``
times. The affinities come from the image only: for each colour channel, ``-|I(p) - I(q)| / (1e-8 + 0.1 σ(p))``
with σ the (unbiased) standard deviation of the ``9 × len(dilations)`` pixels of p's dilated 3×3 windows taken
together (the centre once per dilation: ``pamr.py`` ``LocalStDev`` stacks every dilation's 9 shifts before its
``std``), averaged over channels and softmax-normalised over the ``8 × len(dilations)`` neighbours; borders repeat
the edge pixel. Every score
channel is refined on its own with the same affinities, so channels can be refined in chunks (the evaluator does,
to bound memory at 2048×1024).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: the 8 neighbours of a 3x3 window, row-major without the centre (the order of the reference's shift kernels)
NEIGHBOURS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifted(x: Tensor, dy: int, dx: int, pad: int) -> Tensor:
    """``x`` ``[N,C,H,W]`` read at ``(y + dy, x + dx)``, edge pixels repeated beyond the border (``pad >= |dy|, |dx|``
    is the replicate padding already applied to ``x``)."""
    height, width = x.shape[-2] - 2 * pad, x.shape[-1] - 2 * pad
    return x[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def pamr_affinity(image: Tensor, dilations: Sequence[int]) -> Tensor:
    """``[B,3,H,W]`` image -> ``[B, 8·len(dilations), H, W]`` neighbour weights (softmax over the neighbours)."""
    padded = {d: F.pad(image, [d] * 4, mode="replicate") for d in dilations}
    windows = torch.stack([_shifted(padded[d], dy * d, dx * d, d) for d in dilations
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dim=2)
    spread = 1e-8 + 0.1 * windows.std(dim=2)  # [B,C,H,W], over every dilation's 9 pixels at once
    del windows
    logits = []
    for d in dilations:
        for dy, dx in NEIGHBOURS:
            difference = (image - _shifted(padded[d], dy * d, dx * d, d)).abs()
            logits.append((-difference / spread).mean(dim=1))  # mean over colour channels
    return torch.stack(logits, dim=1).softmax(dim=1)


def pamr_refine(scores: Tensor, affinity: Tensor, dilations: Sequence[int], steps: int) -> Tensor:
    """``steps`` rounds of ``scores(p) <- Σ_q w(p, q) scores(q)`` over the neighbours q of :func:`pamr_affinity`;
    ``scores`` ``[B,K,H,W]`` at the affinity's size."""
    if scores.shape[-2:] != affinity.shape[-2:]:
        raise ValueError(f"PAMR scores {tuple(scores.shape[-2:])} and image {tuple(affinity.shape[-2:])} differ in "
                         "size")
    weights = affinity.unsqueeze(2).to(scores.dtype)  # [B,P,1,H,W]
    for _ in range(steps):
        refined = torch.zeros_like(scores)
        index = 0
        for d in dilations:
            padded = F.pad(scores, [d] * 4, mode="replicate")
            for dy, dx in NEIGHBOURS:
                refined += _shifted(padded, dy * d, dx * d, d) * weights[:, index]
                index += 1
        scores = refined
    return scores


class PAMR:
    """PAMR of one image: the affinities once, then any number of score chunks refined with them."""

    def __init__(self, image: Tensor, steps: int, dilations: Sequence[int]):
        """``image`` ``[1,3,H,W]`` at the size of the scores to refine (NACLIP: the normalised model input, resized
        bilinearly to the label size)."""
        self.steps, self.dilations = int(steps), tuple(int(d) for d in dilations)
        self.affinity = pamr_affinity(image.float(), self.dilations)

    def __call__(self, scores: Tensor) -> Tensor:
        return pamr_refine(scores, self.affinity, self.dilations, self.steps)
