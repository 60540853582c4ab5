"""Pixel segments of an embedding map: batched spherical k-means, SegSort's clustering, the cut by regions and segment
pooling — shared by CLIP-S4's training step and the k-NN probe.

Two ways to cut a view into segments (``segments`` setting of CLIP-S4 and its k-NN probe):

- ``segsort`` (default): SegSort/HSG's clustering, which CLIP-S4 cites for its segments — spherical k-means over
  ``[embedding, w · ((y, x) − 0.5)]`` re-normalised (y, x in [0, 1] over the grid; ``location_weight`` w = 1 in
  HSG), started from a regular grid of ``ky × kx`` cells (6 × 6 for 36), M-step then E-step each iteration
  (HSG ``segsort/common.py``: ``segment_by_kmeans``, ``kmeans_with_initial_labels``). Segments are compact regions.
- ``embedding``: spherical k-means on the embeddings alone from k random pixels (segments may be scattered).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SEGMENTATIONS", "spherical_kmeans", "grid_shape", "grid_labels", "segsort_kmeans", "segment_pixels",
           "cut_by_regions", "segment_mean", "segment_sizes"]

SEGMENTATIONS = ("segsort", "embedding")


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


def grid_shape(k: int) -> tuple[int, int]:
    """(rows, columns) of the start grid for ``k`` segments: the most square factorisation (36 -> 6 × 6)."""
    rows = max(d for d in range(1, int(k**0.5) + 1) if k % d == 0)
    return rows, k // rows


def grid_labels(height: int, width: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """``[height * width]`` start labels: a ``grid_shape(k)`` grid of cells (HSG's ``initialize_cluster_labels``:
    ``round(linspace(0, cells - 1, side))`` per axis, label = row + rows · column)."""
    rows, cols = grid_shape(k)
    y = torch.linspace(0, rows - 1, height, device=device).round().long()
    x = torch.linspace(0, cols - 1, width, device=device).round().long()
    return (y[:, None] + rows * x[None, :]).flatten()


@torch.no_grad()
def segsort_kmeans(x: Tensor, height: int, width: int, k: int, iterations: int = 20,
                   location_weight: float = 1.0) -> Tensor:
    """SegSort/HSG segments: ``x [B, N = height·width, D]`` (row-major grid) -> assignments ``[B, N]`` in [0, k).

    Points are ``normalize([normalize(x), location_weight · ((y, x) − 0.5)])``; labels start from
    :func:`grid_labels`; each iteration sets every segment's centre to the normalised sum of its points, then
    every point to its most similar centre (an emptied segment's centre is 0 and takes no points back).
    """
    batch, n, _ = x.shape
    if n != height * width:
        raise ValueError(f"{n} points are not a {height}x{width} grid")
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k}, N={n}")
    y = torch.linspace(0, 1, height, device=x.device)
    xs = torch.linspace(0, 1, width, device=x.device)
    location = torch.stack(torch.meshgrid(y, xs, indexing="ij"), dim=-1).reshape(1, n, 2) - 0.5
    points = torch.cat([F.normalize(x.float(), dim=-1), location_weight * location.expand(batch, -1, -1)], dim=-1)
    points = F.normalize(points, dim=-1)
    assign = grid_labels(height, width, k, x.device)[None].expand(batch, -1)
    for _ in range(max(1, iterations)):
        sums = torch.zeros(batch, k, points.shape[-1], device=x.device)
        centres = F.normalize(sums.scatter_add_(1, assign[..., None].expand_as(points), points), dim=-1)
        assign = torch.einsum("bnd,bkd->bnk", points, centres).argmax(dim=-1)
    return assign


@torch.no_grad()
def segment_pixels(x: Tensor, height: int, width: int, k: int, iterations: int = 20, method: str = "segsort",
                   location_weight: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """``[B, N, D]`` pixel embeddings of ``height × width`` grids -> segment assignments ``[B, N]`` by ``method``
    (:data:`SEGMENTATIONS`; ``generator``: the random starts of ``embedding``)."""
    if method == "segsort":
        return segsort_kmeans(x, height, width, k, iterations, location_weight)
    if method == "embedding":
        return spherical_kmeans(x, k, iterations, generator)[0]
    raise ValueError(f"segments must be one of {SEGMENTATIONS}, got {method!r}")


@torch.no_grad()
def cut_by_regions(clusters: Tensor, regions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Clusters ``[V, N]`` of V views, cut by region labels ``[V, N]`` (or not, when None) as HSG partitions its
    k-means clusters by its region labels (``segsort/common.py``: ``prepare_prototype_labels``): every
    (view, cluster, region) that holds a pixel is one segment.

    Returns ``(index [V, N]`` of each pixel's segment in ``[0, S)``, ``view [S]``, ``region [S])``; segments are
    numbered in (view, cluster, region) order, so none is empty.
    """
    views = torch.arange(clusters.shape[0], device=clusters.device)[:, None].expand_as(clusters)
    region = torch.zeros_like(clusters) if regions is None else regions.to(clusters.device)
    keys, index = torch.unique(torch.stack([views, clusters, region], dim=-1).reshape(-1, 3), dim=0,
                               return_inverse=True)
    return index.view_as(clusters), keys[:, 0], keys[:, 2]


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
