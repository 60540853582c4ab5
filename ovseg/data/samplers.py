"""Samplers: evaluation sharding that never repeats a sample, and a training order that resumes exactly.

Lightning's default validation/test sampler pads ranks by repeating samples, which changes the
numbers under DDP (Lightning#7929). Each rank here takes a contiguous block; blocks differ in size
by at most one and together hold every index exactly once.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


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


class ResumableShuffleSampler(Sampler[int]):
    """Training order that a checkpoint can resume mid-epoch, exactly.

    The order is :class:`torch.utils.data.DistributedSampler`'s (``shuffle=True, drop_last=True``): a permutation
    seeded by ``seed + epoch``, cut to a multiple of the world size, rank ``r`` taking every ``world``-th index from
    ``r``. Each index is yielded as a key ``epoch * num_samples + index`` so the dataset
    (:class:`EpochSeededSamples`) can draw its augmentations from (seed, epoch, index) alone, whichever process or
    worker loads it. :meth:`resume` makes the next pass of that epoch start after the samples already trained on.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples, self.rank, self.world_size, self.seed = num_samples, rank, world_size, seed
        self.per_rank = num_samples // world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already seen)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at every epoch start
        self.epoch = epoch

    def resume(self, epoch: int, seen: int) -> None:
        self._resume = (epoch, seen)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        mine = order[: self.per_rank * self.world_size][self.rank::self.world_size]
        skip = 0
        if self._resume is not None:
            epoch, seen = self._resume
            skip = seen if epoch == self.epoch else 0
            self._resume = None
        offset = self.epoch * self.num_samples
        return iter([offset + index for index in mine[skip:]])

    def __len__(self) -> int:
        return self.per_rank


class EpochSeededSamples(Dataset):
    """A training dataset whose sample ``k`` of epoch ``e`` sees numpy's and Python's global random streams seeded
    from ``(seed, e, k)`` (keys from :class:`ResumableShuffleSampler`): augmentations are the same in any process,
    loader worker or resumed run. The main process's torch stream is left alone (it is the model's)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.num_samples = len(dataset)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(int(key), self.num_samples)
        state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
        np.random.seed(int(state[0]))
        random.seed(int(state[1]))
        return self.dataset[index]
