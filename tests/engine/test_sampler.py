"""Batch order: seeded per epoch, split across processes, resumable from any batch."""

import pytest

from soco.engine.sampler import EpochBatchSampler, RunBatchSampler, batches_per_epoch
from soco.errors import DataError


def test_epoch_order_is_a_seeded_permutation_split_by_rank():
    rank0 = list(EpochBatchSampler(20, 3, seed=1, epoch=0, rank=0, world_size=2))
    rank1 = list(EpochBatchSampler(20, 3, seed=1, epoch=0, rank=1, world_size=2))
    assert len(rank0) == len(rank1) == 3  # 10 images per rank, 3 full batches of 3
    seen = [i for batch in rank0 + rank1 for i in batch]
    assert len(seen) == len(set(seen)) == 18
    assert list(EpochBatchSampler(20, 3, seed=1, epoch=0)) == list(EpochBatchSampler(20, 3, seed=1, epoch=0))
    assert list(EpochBatchSampler(20, 3, seed=1, epoch=1)) != list(EpochBatchSampler(20, 3, seed=1, epoch=0))


def test_run_sampler_crosses_epochs_and_resumes_at_any_batch():
    def run(start):
        return list(RunBatchSampler(10, 2, seed=0, rank=0, world_size=1, batches_used_per_epoch=4,
                                    start_batch=start, total_batches=11))

    whole = run(0)
    assert len(whole) == 11
    assert [batch[0][0] for batch in whole] == [0] * 4 + [1] * 4 + [2] * 3  # epoch tags
    epoch0 = [index for batch in whole[:4] for _, index in batch]
    assert epoch0 == [i for b in list(EpochBatchSampler(10, 2, seed=0, epoch=0))[:4] for i in b]
    for start in (1, 4, 7, 10):
        assert run(start) == whole[start:]


def test_data_smaller_than_a_batch_is_a_clear_error():
    with pytest.raises(DataError, match="lower train.batch_size"):
        batches_per_epoch(5, 4, 2)
