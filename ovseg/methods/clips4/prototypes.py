"""Unknown prototypes (CLIP-S4 step 7, reconstruction): target classes without names.

A bank of ``M`` unit vectors in CLIP space. Until initialised, it collects the CLIP segment embeddings
that no known prototype explains (CLIP's best softmax probability over the known prototypes, at τ_s,
below ``threshold``); once it holds ``init_min_segments`` of them, spherical k-means over them gives the
``M`` prototypes. Afterwards every step moves each prototype towards the mean of the unexplained
segments assigned to it (nearest prototype): ``p <- normalize(m p + (1 - m) mean)``. Buffers only: the
prototypes never receive gradients. Updates use the segments of all processes (gathered), so every
process holds the same bank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.methods.clips4.segments import spherical_kmeans

__all__ = ["UnknownPrototypes", "unexplained"]


def unexplained(clip_segments: Tensor, known: Tensor, temperature: float, threshold: float) -> Tensor:
    """``[S]`` bool: segments whose best softmax probability over the known prototypes is below ``threshold``."""
    if known.shape[0] == 0:
        return torch.ones(clip_segments.shape[0], dtype=torch.bool, device=clip_segments.device)
    probs = F.softmax(clip_segments @ known.t() / temperature, dim=-1)
    return probs.max(dim=-1).values < threshold


class UnknownPrototypes(nn.Module):
    prototypes: Tensor
    initialized: Tensor

    def __init__(self, num: int, dim: int, momentum: float = 0.99, threshold: float = 0.5,
                 temperature: float = 0.01, init_min_segments: int | None = None, kmeans_iterations: int = 20):
        super().__init__()
        self.num, self.momentum, self.threshold, self.temperature = num, momentum, threshold, temperature
        self.init_min_segments = max(num, init_min_segments if init_min_segments is not None else 4 * num)
        self.kmeans_iterations = kmeans_iterations
        self.register_buffer("prototypes", torch.zeros(num, dim))
        self.register_buffer("initialized", torch.tensor(False))
        self._pending: list[Tensor] = []

    @property
    def active(self) -> Tensor:
        """The prototypes in use: ``[M, D]`` once initialised, else ``[0, D]``."""
        return self.prototypes if bool(self.initialized) and self.num > 0 else self.prototypes[:0]

    @torch.no_grad()
    def update(self, clip_segments: Tensor, known: Tensor, generator: torch.Generator | None = None) -> int:
        """Initialise from / EMA-update with the unexplained segments among ``clip_segments`` ``[S, D]``
        (unit norm, detached, identical on every process). Returns how many were unexplained."""
        if self.num == 0:
            return 0
        segments = F.normalize(clip_segments.detach().float(), dim=-1)
        mask = unexplained(segments, F.normalize(known.float(), dim=-1), self.temperature, self.threshold)
        segments = segments[mask]
        if segments.shape[0] == 0:
            return 0
        if not bool(self.initialized):
            self._pending.append(segments)
            pool = torch.cat(self._pending)
            if pool.shape[0] >= self.init_min_segments:
                _, centres = spherical_kmeans(pool[None], self.num, self.kmeans_iterations, generator)
                self.prototypes.copy_(centres[0])
                self.initialized.fill_(True)
                self._pending.clear()
            return int(segments.shape[0])
        assign = (segments @ self.prototypes.t()).argmax(dim=-1)
        sums = torch.zeros_like(self.prototypes).index_add_(0, assign, segments)
        counts = torch.bincount(assign, minlength=self.num).to(sums.dtype)[:, None]
        hit = counts[:, 0] > 0
        mean = sums / counts.clamp_min(1)
        updated = F.normalize(self.momentum * self.prototypes + (1 - self.momentum) * mean, dim=-1)
        self.prototypes.copy_(torch.where(hit[:, None], updated, self.prototypes))
        return int(segments.shape[0])
