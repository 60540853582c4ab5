"""Evaluation sharding that never repeats a sample.

Lightning's default validation/test sampler pads ranks by repeating samples, which changes the
numbers under DDP (Lightning#7929). Each rank here takes a contiguous block; blocks differ in size
by at most one and together hold every index exactly once.
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Sampler


def shard_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class UnrepeatedShardSampler(Sampler[int]):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.start, self.stop = shard_bounds(num_samples, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
