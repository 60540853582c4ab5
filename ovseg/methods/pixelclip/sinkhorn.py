"""Balanced assignment of masks to clusters: Sinkhorn-Knopp over the global (all-process) batch.

Adapted in spirit from SwAV's ``distributed_sinkhorn`` as PixelCLIP uses it: the cluster-row sums and the total
are all-reduced so that N processes, each holding a slice of the masks, compute exactly the assignment a single
process holding all of them would (columns are per mask and stay local).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["distributed_sinkhorn"]


def _all_reduce(tensor: Tensor, group=None) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


@torch.no_grad()
def distributed_sinkhorn(logits: Tensor, iterations: int = 3, group=None) -> Tensor:
    """Soft assignment ``Q`` [M, K] of this process's M masks (rows: masks, columns: K clusters).

    ``logits`` are the masks' scaled similarities to the cluster prototypes (``eps · cos``). Q starts as the
    softmax over clusters; each iteration scales every cluster's total mass (summed over all masks of all
    processes) to 1/K, then every mask's row to 1/B (B = global mask count); the result is multiplied by B so
    that each mask's row sums to 1. Every process must call this, even with ``M == 0`` (the all-reduces are
    collective).
    """
    logits = logits.float()
    q = logits.softmax(dim=-1).t().contiguous()  # [K, M]
    num_clusters = q.shape[0]
    total = _all_reduce(q.sum().reshape(1), group)  # = global number of masks (each softmax column sums to 1)
    if float(total) == 0.0:
        return q.t()
    q /= total
    for _ in range(iterations):
        rows = _all_reduce(q.sum(dim=1, keepdim=True), group)
        q /= rows
        q /= num_clusters
        q /= q.sum(dim=0, keepdim=True)
        q /= total
    q *= total
    return q.t()
