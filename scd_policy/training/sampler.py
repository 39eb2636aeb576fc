"""A resumable, rank-sharded random sampler.

Epoch ``e`` visits a permutation drawn from ``seed + e``; rank ``r`` of ``world`` takes every
``world``-th index of it. Because the order is a pure function of (seed, epoch, rank), a resumed run
continues exactly where the interrupted one stopped by skipping the batches it already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShardedSampler(Sampler[int]):
    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        if dataset_size < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch  # batches (of this rank) already consumed before a resume
        # Every rank gets the same number of samples per epoch (drop the ragged tail).
        self.per_rank = max(1, dataset_size // world_size)

    def _epoch_indices(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        if self.dataset_size < self.world_size:  # tiny datasets: every rank still gets a sample
            order = order.repeat(self.world_size)
        return order[self.rank :: self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[int]:
        skip = self.start_batch * self.batch_size
        epoch, offset = divmod(skip, self.per_rank)
        while True:
            indices = self._epoch_indices(epoch)
            yield from indices[offset:].tolist()
            epoch, offset = epoch + 1, 0
