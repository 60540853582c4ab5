"""Gathering across processes with the gradient kept for this process's part."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_local_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``x`` (same shape on every process) over processes along dim 0.

    The local slice is ``x`` itself, so gradients reach this process's inputs; the other processes'
    slices are constants (each process back-propagates its own part, DDP averages the gradients).
    Returns ``(gathered, offset of the local slice)``.
    """
    rank, size = world()
    if size == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0), rank * x.shape[0]


def gather_detached(x: Tensor) -> Tensor:
    """``all_gather`` without gradient, concatenated along dim 0 (identical on every process)."""
    rank, size = world()
    if size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)
