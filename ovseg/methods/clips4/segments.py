"""Pixel segments: batched spherical k-means and segment pooling (CLIP-S4 steps 3 and 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["spherical_kmeans", "segment_mean", "segment_sizes"]


@torch.no_grad()
def spherical_kmeans(
    x: Tensor, k: int, iterations: int = 20, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Spherical k-means per batch element.

    Args:
        x: ``[B, N, D]`` points (L2-normalised inside).
        k: clusters per element (at most N).
        iterations: assignment/update rounds.
        generator: RNG for the initial centres (k distinct points per element).
    Returns:
        ``(assignments [B, N] int64 in [0, k), centres [B, k, D] unit norm)``. A cluster that loses all
        its points keeps its previous centre (it may end up empty; see :func:`segment_sizes`).
    """
    batch, n, _ = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k}, N={n}")
    x = F.normalize(x.float(), dim=-1)
    noise = torch.rand(batch, n, generator=generator, device="cpu" if generator is None else generator.device)
    init = noise.to(x.device).argsort(dim=1)[:, :k]  # k distinct points per element
    centres = torch.gather(x, 1, init[..., None].expand(-1, -1, x.shape[-1]))
    assign = torch.zeros(batch, n, dtype=torch.long, device=x.device)
    for _ in range(max(1, iterations)):
        assign = torch.einsum("bnd,bkd->bnk", x, centres).argmax(dim=-1)
        sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand_as(x), x)
        norms = sums.norm(dim=-1, keepdim=True)
        centres = torch.where(norms > 0, sums / norms.clamp_min(1e-12), centres)
    assign = torch.einsum("bnd,bkd->bnk", x, centres).argmax(dim=-1)
    return assign, centres


def segment_sizes(assign: Tensor, k: int, weight: Tensor | None = None) -> Tensor:
    """``[B, N]`` assignments -> pixel count per segment ``[B, k]`` (optionally weighted)."""
    w = torch.ones_like(assign, dtype=torch.float32) if weight is None else weight.float()
    return torch.zeros(assign.shape[0], k, device=assign.device).scatter_add_(1, assign, w)


def segment_mean(x: Tensor, assign: Tensor, k: int, normalize: bool = True) -> Tensor:
    """Mean of ``x [B, N, D]`` over each segment -> ``[B, k, D]`` (differentiable; empty segments are 0),
    L2-normalised when ``normalize``."""
    sums = torch.zeros(x.shape[0], k, x.shape[-1], device=x.device, dtype=x.dtype)
    sums = sums.scatter_add(1, assign[..., None].expand_as(x), x)
    counts = segment_sizes(assign, k).to(x.dtype)[..., None]
    mean = sums / counts.clamp_min(1)
    return F.normalize(mean, dim=-1) if normalize else mean
