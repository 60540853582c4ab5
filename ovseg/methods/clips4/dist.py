"""Gathering across processes so that N processes train exactly as one process with the N-fold batch.

The segment prototypes are gathered *with* gradient (``torch.distributed.nn.functional.all_gather``: its backward
sends every process's gradient for a slice back to the process that computed it), and each process's loss is its
sum divided by the global count over N (:func:`global_mean`). DDP then averages the N gradients, which gives
exactly the gradient of the single-process mean loss over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``x`` (same shape on every process) over processes along dim 0, differentiably: the gradient
    of every process's loss with respect to a slice reaches the process that computed it. Returns
    ``(gathered, offset of the local slice)``."""
    rank, size = world()
    if size == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0), rank * x.shape[0]


def global_mean(values: Tensor) -> Tensor:
    """This process's share of the mean of ``values`` over all processes: ``sum(values) · N / count`` (the
    count summed over processes, without gradient). Summed over processes — or averaged by DDP after the
    backward — it is the mean over the global batch, whatever each process's count."""
    _, size = world()
    count = torch.tensor(float(values.numel()), device=values.device)
    if size > 1:
        dist.all_reduce(count)
    return values.sum() * (size / count.clamp_min(1.0))  # no values anywhere: 0, with a graph


def gather_detached(x: Tensor) -> Tensor:
    """``all_gather`` without gradient, concatenated along dim 0 (identical on every process)."""
    rank, size = world()
    if size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def global_max(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over processes (segment counts differ per process; gathers need one shape)."""
    _, size = world()
    if size == 1:
        return value
    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)
