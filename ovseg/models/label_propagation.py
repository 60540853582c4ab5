"""Label propagation on graphs of patches and pixels (LPOSS, Stojnic et al., CVPR 2025), in torch.

What LPOSS's released code (github.com/vladan-stojnic/LPOSS, ``segmentation/evaluation/lposs_eval.py``) does with
faiss, cupy and kornia, written here with torch alone (CPU or GPU):

- :func:`knn_inner_product`: exact inner-product k nearest neighbours of every row among all rows (faiss
  ``knn_gpu(..., METRIC_INNER_PRODUCT)`` = ``IndexFlatIP``), the row itself included;
- :func:`patch_graph`: ``get_lposs_laplacian``'s affinity: kNN similarities clipped at 0, to the power ``gamma``,
  times the geometric affinity ``exp(-sigma · distance^power)`` of the patch centres, symmetrised ``W + Wᵀ``,
  diagonal removed;
- :func:`normalized_edge_weights`: ``normalize_connection_graph``: ``D^-1/2 W D^-1/2`` (a node without edges gets
  degree 1), then ``alpha ·`` it, each product rounded in float32 as the reference's float32 sparse matrices do;
- :func:`conjugate_gradient`: cupy's ``cupyx.scipy.sparse.linalg.cg`` (``x0 = 0``, stop when ``‖r‖ <= tol · ‖b‖``
  or after ``maxiter`` steps, ``b = 0`` returned as is) for many right-hand sides at once, each column with its own
  step sizes and stopping, in float64 (the reference's ``L = eye(N) - alpha · Wn`` is float64: ``eye``'s dtype);
- :func:`propagate_labels`: ``perform_lp``: ``(I - alpha · Wn) X = Y`` column by column;
- :func:`pixel_graph` / :class:`PixelGraph`: ``get_lposs_plus_laplacian``: every pixel joined to the pixels of its
  ``(2·radius+1)²`` neighbourhood with weight ``exp(-‖lab_p - lab_q‖ / tau)`` (CIE Lab divided by (100, 128,
  128)), kept as one weight map per offset (a stencil) instead of a sparse matrix;
- :func:`rgb_to_lab`: kornia ``color.rgb_to_lab`` (sRGB -> linear -> XYZ (D65) -> CIE Lab).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PatchGraph", "PixelGraph", "conjugate_gradient", "knn_inner_product", "normalized_edge_weights",
           "patch_graph", "pixel_graph", "propagate_labels", "rgb_to_lab", "sparse_matvec"]

#: rows of the similarity matrix computed at once by :func:`knn_inner_product`
KNN_ROW_CHUNK = 2048


def knn_inner_product(features: Tensor, k: int, row_chunk: int = KNN_ROW_CHUNK) -> tuple[Tensor, Tensor]:
    """The ``k`` largest inner products of each row of ``features`` [N, D] with all rows (itself included), in
    descending order: (similarities [N, k], indices [N, k]). ``k`` above N is clipped to N (faiss would answer -1
    indices there, which the reference's ``gather`` cannot read)."""
    k = min(int(k), features.shape[0])
    sims, indices = [], []
    for start in range(0, features.shape[0], row_chunk):
        block = features[start:start + row_chunk] @ features.T
        top = block.topk(k, dim=1)
        sims.append(top.values)
        indices.append(top.indices)
    return torch.cat(sims), torch.cat(indices)


@dataclass
class PatchGraph:
    """A symmetric sparse graph over N nodes: edge lists (``rows``, ``cols``) and ``weights`` (both directions
    stored, no self-loops)."""

    rows: Tensor
    cols: Tensor
    weights: Tensor
    num_nodes: int


def patch_graph(features: Tensor, positions: Tensor, k: int, gamma: float, sigma: float,
                distance_power: float = 1.0, neighbours: tuple[Tensor, Tensor] | None = None) -> PatchGraph:
    """LPOSS's patch affinity (``get_lposs_laplacian``): unit ``features`` [N, D] (DINO), patch-centre
    ``positions`` [N, 2] (pixels of the resized image; float32). Each node's ``k`` nearest neighbours by inner
    product (:func:`knn_inner_product`) with weight ``max(s, 0)^gamma · exp(-sigma · ‖p_i - p_j‖^distance_power)``;
    the graph is ``W + Wᵀ`` (a pair that are each other's neighbours gets both weights) without its diagonal.
    ``neighbours``: (similarities, indices) [N, k] found elsewhere (the parity hands faiss's over: at the k-th
    neighbour, similarities equal to float rounding may be ordered either way)."""
    n = features.shape[0]
    sims, neighbours = neighbours if neighbours is not None else knn_inner_product(features, k)
    sims = sims.clamp_min(0) ** gamma
    offsets = positions[neighbours] - positions[:, None]  # exact for integer-valued float32 positions
    distance = (offsets ** 2).sum(-1).sqrt() ** distance_power
    weights = (sims * torch.exp(-sigma * distance)).flatten()
    rows = torch.arange(n, device=features.device).repeat_interleave(neighbours.shape[1])
    cols = neighbours.flatten()
    both = torch.sparse_coo_tensor(torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])]),
                                   torch.cat([weights, weights]), (n, n), check_invariants=False).coalesce()
    rows, cols = both.indices()
    off_diagonal = rows != cols
    return PatchGraph(rows[off_diagonal], cols[off_diagonal], both.values()[off_diagonal], n)


def _inverse_sqrt_degree(degree: Tensor) -> Tensor:
    """``normalize_connection_graph``'s ``D``: ``1 / sqrt(S)`` with ``S = 0`` read as 1."""
    return 1.0 / torch.sqrt(torch.where(degree == 0, torch.ones_like(degree), degree))


def normalized_edge_weights(graph: PatchGraph, alpha: float) -> Tensor:
    """``alpha · (D^-1/2 W D^-1/2)`` per edge, in the weights' dtype with the reference's rounding order
    (``(d_i · w_ij) · d_j``, then ``alpha ·``: float32 sparse products in ``normalize_connection_graph`` and
    ``get_lposs_laplacian``)."""
    degree = torch.zeros(graph.num_nodes, dtype=graph.weights.dtype, device=graph.weights.device)
    degree.index_add_(0, graph.rows, graph.weights)
    d = _inverse_sqrt_degree(degree)
    return alpha * ((d[graph.rows] * graph.weights) * d[graph.cols])


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, tol: float = 1e-6,
                       maxiter: int = 10) -> Tensor:
    """cupy's ``cg(A, b, tol=tol, maxiter=maxiter)`` (``cupyx/scipy/sparse/linalg/_iterative.py``) for every column
    of ``b`` [N, C] at once: ``matvec`` maps [N, C] -> [N, C] (``A`` applied to each column); columns run the same
    recurrence independently (their own ``alpha``/``beta``) and each stops after the step where ``‖r‖ <= tol ·
    ‖b‖``; a zero column is returned as is. Computed in ``b``'s dtype."""
    b_norm = torch.linalg.vector_norm(b, dim=0)
    atol = tol * b_norm
    active = b_norm != 0
    x = torch.zeros_like(b)
    r = b - matvec(x)
    p = r
    rho = None
    for step in range(maxiter):
        if not bool(active.any()):
            break
        rho_previous, rho = rho, (r * r).sum(0)
        if step > 0:
            p = r + (rho / rho_previous) * p
        q = matvec(p)
        step_size = rho / (p * q).sum(0)
        x = torch.where(active, x + step_size * p, x)
        r = torch.where(active, r - step_size * q, r)
        active = active & (torch.linalg.vector_norm(r, dim=0) > atol)
    return torch.where(b_norm == 0, b, x)


def propagate_labels(matvec_normalized: Callable[[Tensor], Tensor], labels: Tensor, tol: float = 1e-6,
                     maxiter: int = 10, column_chunk: int | None = None) -> Tensor:
    """``perform_lp``: solve ``(I - alpha · Wn) X = Y`` for the label scores ``labels`` [N, C] (cast to float64) by
    :func:`conjugate_gradient`; ``matvec_normalized`` applies ``alpha · Wn`` (float64). ``column_chunk``: solve that
    many columns at a time (memory; the columns are independent)."""
    y = labels.double()
    chunk = column_chunk or y.shape[1]
    solved = [conjugate_gradient(lambda v: v - matvec_normalized(v), y[:, c:c + chunk], tol, maxiter)
              for c in range(0, y.shape[1], chunk)]
    return torch.cat(solved, dim=1)


def sparse_matvec(graph: PatchGraph, edge_values: Tensor) -> Callable[[Tensor], Tensor]:
    """``v -> M v`` for the sparse matrix with ``edge_values`` on ``graph``'s edges, in float64."""
    matrix = torch.sparse_coo_tensor(torch.stack([graph.rows, graph.cols]), edge_values.double(),
                                     (graph.num_nodes, graph.num_nodes), check_invariants=False).coalesce()
    return lambda v: torch.sparse.mm(matrix, v)


# -- pixels -----------------------------------------------------------------------------------------------------
def rgb_to_lab(rgb: Tensor) -> Tensor:
    """kornia ``color.rgb_to_lab``: sRGB in [0, 1] ``[..., 3, H, W]`` -> CIE Lab (D65; L in [0, 100])."""
    linear = torch.where(rgb > 0.04045, torch.pow((rgb + 0.055).clamp(min=0.0) / 1.055, 2.4), rgb / 12.92)
    r, g, b = linear.unbind(-3)
    xyz = torch.stack([0.412453 * r + 0.357580 * g + 0.180423 * b,
                       0.212671 * r + 0.715160 * g + 0.072169 * b,
                       0.019334 * r + 0.119193 * g + 0.950227 * b], dim=-3)
    white = torch.tensor([0.95047, 1.0, 1.08883], device=rgb.device, dtype=rgb.dtype).view(3, 1, 1)
    xyz = xyz / white
    threshold = 0.008856
    power = torch.pow(xyz.clamp(min=threshold), 1 / 3.0)
    scaled = 7.787 * xyz + 4.0 / 29.0
    f = torch.where(xyz > threshold, power, scaled)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([(116.0 * fy) - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def _neighbours(padded: Tensor, radius: int, offset: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """From ``padded`` [H + 2r, W + 2r, ...] (zeros around): each pixel's neighbour at ``offset`` [H, W, ...]."""
    (dy, dx), (h, w) = offset, size
    return padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w]


def _padded(values: Tensor, radius: int) -> Tensor:
    """[H, W, C] -> [H + 2r, W + 2r, C], zeros around."""
    return F.pad(values.permute(2, 0, 1), (radius,) * 4).permute(1, 2, 0)


@dataclass
class PixelGraph:
    """A pixel graph on an H×W grid as a stencil: ``weights[o]`` [H, W] joins pixel (y, x) to (y + dy, x + dx) for
    ``offsets[o] = (dy, dx)`` (zero where the neighbour falls outside)."""

    offsets: list[tuple[int, int]]
    weights: Tensor  # [O, H, W]
    radius: int

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.weights.shape[1:])

    def normalized(self, alpha: float) -> "PixelGraph":
        """``alpha · D^-1/2 W D^-1/2`` (:func:`normalized_edge_weights`' rounding order)."""
        d = _inverse_sqrt_degree(self.weights.sum(0))
        padded = _padded(d[..., None], self.radius)[..., 0]
        scaled = torch.stack([(d * w) * _neighbours(padded, self.radius, offset, self.size)
                              for offset, w in zip(self.offsets, self.weights)])
        return PixelGraph(self.offsets, alpha * scaled, self.radius)

    def matvec(self, values: Tensor) -> Tensor:
        """``W v`` for ``values`` [H·W, C] (row-major pixels), in ``values``' dtype."""
        h, w = self.size
        grid = values.reshape(h, w, -1)
        padded = _padded(grid, self.radius)
        out = torch.zeros_like(grid)
        for offset, weight in zip(self.offsets, self.weights):
            out += weight.to(values.dtype)[..., None] * _neighbours(padded, self.radius, offset, (h, w))
        return out.reshape(h * w, -1)


def pixel_graph(image01: Tensor, radius: int, tau: float) -> PixelGraph:
    """LPOSS+'s pixel affinity (``get_pixel_connections`` + ``get_lposs_plus_laplacian``) of one image [3, H, W] in
    [0, 1]: each pixel joined to every other pixel of its ``(2·radius+1)²`` window with weight ``exp(-‖lab_p -
    lab_q‖ / tau)``, Lab divided by (100, 128, 128)."""
    lab = rgb_to_lab(image01).permute(1, 2, 0)
    lab = lab / torch.tensor([100, 128, 128], device=lab.device, dtype=lab.dtype)
    h, w = lab.shape[:2]
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if (dy, dx) != (0, 0)]
    padded_lab = _padded(lab, radius)
    padded_inside = _padded(torch.ones(h, w, 1, device=lab.device, dtype=lab.dtype), radius)[..., 0]
    weights = []
    for offset in offsets:
        squared = ((lab - _neighbours(padded_lab, radius, offset, (h, w))) ** 2).sum(-1)
        weight = torch.exp(-torch.sqrt(squared) / tau)
        weights.append(torch.where(_neighbours(padded_inside, radius, offset, (h, w)) > 0, weight,
                                   torch.zeros_like(weight)))
    return PixelGraph(offsets, torch.stack(weights), radius)
