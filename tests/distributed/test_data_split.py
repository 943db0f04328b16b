"""Splitting data across ranks: shares partition every global batch; evaluation is padded to
the same number of collective calls on every rank and covers every row once."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchrec_hstu.distributed import (
    epoch_permutation,
    eval_shards,
    num_global_batches,
    rank_slice,
    step_generator,
    train_shards,
)


@given(n=st.integers(0, 50), world=st.integers(1, 6))
def test_rank_slices_partition_in_order(n, world):
    rows = torch.arange(100, 100 + n)
    parts = [rank_slice(rows, r, world) for r in range(world)]
    assert torch.equal(torch.cat(parts), rows)
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1


@given(users=st.integers(1, 80), world=st.integers(1, 4), per_rank=st.integers(1, 6),
       epoch=st.integers(0, 3), start=st.integers(0, 3))
def test_train_shards_rebuild_the_global_batches(users, world, per_rank, epoch, start):
    global_batch = world * per_rank
    # The oracle: the epoch's permutation cut into full global batches (a 1-process run's batches).
    order = epoch_permutation(users, 7, epoch)
    expected = [order[s * global_batch : (s + 1) * global_batch] for s in range(users // global_batch)]
    per_rank_steps = [list(train_shards(users, global_batch, 7, epoch, r, world, start_step=start)) for r in range(world)]
    steps = [[s for s, _ in shard] for shard in per_rank_steps]
    assert all(s == list(range(start, len(expected))) for s in steps)
    for i, step in enumerate(range(start, len(expected))):
        rebuilt = torch.cat([per_rank_steps[r][i][1] for r in range(world)])
        assert torch.equal(rebuilt, expected[step])
    assert num_global_batches(users, global_batch) == len(expected)


@given(users=st.integers(1, 60), world=st.integers(1, 5), batch=st.integers(1, 9))
def test_eval_shards_cover_every_row_once_with_equal_call_counts(users, world, batch):
    shards = [list(eval_shards(users, batch, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    valid = torch.cat([rows for shard in shards for rows, ok in shard if ok])
    assert torch.equal(valid.sort().values, torch.arange(users))
    assert all(rows.numel() >= 1 for shard in shards for rows, _ in shard)


def test_generators_depend_only_on_their_position():
    assert torch.equal(epoch_permutation(20, 1, 2), epoch_permutation(20, 1, 2))
    assert not torch.equal(epoch_permutation(20, 1, 2), epoch_permutation(20, 1, 3))
    a = torch.randint(100, (8,), generator=step_generator(1, 2, 3))
    b = torch.randint(100, (8,), generator=step_generator(1, 2, 3))
    c = torch.randint(100, (8,), generator=step_generator(1, 2, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments():
    with pytest.raises(ValueError, match="global_batch_size=1 must be >= world_size=2"):
        list(train_shards(10, 1, 0, 0, 0, 2))
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        rank_slice(torch.arange(3), 2, 2)
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        list(eval_shards(3, 0, 0, 1))
