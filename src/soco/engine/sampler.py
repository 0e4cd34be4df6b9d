"""Deterministic, resumable batch order: a seeded permutation per epoch, split across processes."""

from __future__ import annotations

import torch

from soco.errors import DataError


class EpochBatchSampler:
    """Batches of dataset indices for one epoch of one process, starting at a given batch.

    The permutation depends only on (seed, epoch), so a resumed run sees the same order; each process
    takes a strided share and the tail is dropped so that every process has the same batch count.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0):
        self.batches_per_epoch = batches_per_epoch(dataset_size, batch_size, world_size)
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.start_batch = start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)[self.rank :: self.world_size]
        for batch in range(self.start_batch, self.batches_per_epoch):
            yield order[batch * self.batch_size : (batch + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def batches_per_epoch(dataset_size: int, batch_size: int, world_size: int) -> int:
    """Full batches each process gets per epoch; an error if the data is smaller than one batch."""
    count = (dataset_size // world_size) // batch_size
    if count == 0:
        raise DataError(
            f"{dataset_size} usable images cannot fill one batch of {batch_size} on each of {world_size} "
            "processes: lower train.batch_size"
        )
    return count


class RunBatchSampler:
    """Batches of (epoch, index) pairs from a given step to the end of training, across epochs.

    One loader then serves the whole run: its workers start once instead of at every epoch. Each
    epoch yields its first `batches_used_per_epoch` batches of EpochBatchSampler's order.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int, world_size: int,
                 batches_used_per_epoch: int, start_batch: int, total_batches: int):
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_used_per_epoch = batches_used_per_epoch
        self.start_batch, self.total_batches = start_batch, total_batches

    def __iter__(self):
        batch = self.start_batch
        while batch < self.total_batches:
            epoch, within = divmod(batch, self.batches_used_per_epoch)
            epoch_batches = EpochBatchSampler(self.dataset_size, self.batch_size, self.seed, epoch, self.rank,
                                              self.world_size, start_batch=within)
            for indices in epoch_batches:
                if within >= self.batches_used_per_epoch or batch >= self.total_batches:
                    break
                yield [(epoch, index) for index in indices]
                within += 1
                batch += 1

    def __len__(self) -> int:
        return max(0, self.total_batches - self.start_batch)
