"""SequenceDataset, leave-last-out split and batching vs plain-Python oracles."""

import random

import pytest
import torch

from torchrec_hstu.data.sequences import (
    SequenceDataset,
    iterate_batches,
    leave_last_out,
    make_batch,
    num_batches,
)


def _dataset(seqs, num_items=50):
    """``seqs``: list of per-user item lists; timestamps = 10 * position."""
    ids = [i for s in seqs for i in s]
    ts = [10 * p for s in seqs for p in range(len(s))]
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    return SequenceDataset(
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(ts, dtype=torch.int64),
        torch.tensor(offsets, dtype=torch.int64),
        num_items=num_items,
    )


def _random_seqs(rng, users=20, max_len=12, num_items=50):
    return [[rng.randrange(num_items) for _ in range(rng.randrange(0, max_len))] for _ in range(users)]


def test_leave_last_out_matches_oracle():
    rng = random.Random(0)
    seqs = _random_seqs(rng)
    split = leave_last_out(_dataset(seqs), min_history=2)
    kept = [s for s in seqs if len(s) >= 3]
    assert split.train.num_users == len(kept)
    for u, s in enumerate(kept):
        ids, ts = split.train.user(u)
        assert ids.tolist() == s[:-1]
        assert ts.tolist() == [10 * p for p in range(len(s) - 1)]
        assert split.test_targets[u].item() == s[-1]
        assert split.test_timestamps[u].item() == 10 * (len(s) - 1)


def test_make_batch_keeps_latest_tokens():
    rng = random.Random(1)
    seqs = _random_seqs(rng, users=15, max_len=20)
    ds = _dataset(seqs)
    users = torch.tensor([3, 0, 7, 7, 14])
    batch = make_batch(ds, users, max_seq_len=5)
    expected = [seqs[u][-5:] if len(seqs[u]) > 5 else seqs[u] for u in users.tolist()]
    assert batch.lengths.tolist() == [len(e) for e in expected]
    assert batch.item_ids.tolist() == [i for e in expected for i in e]
    assert batch.max_seq_len == max(1, max(len(e) for e in expected))
    stamps = [10 * p for u in users.tolist() for p in range(len(seqs[u]))[-5:]]
    assert batch.timestamps.tolist() == stamps


def test_iterate_batches_covers_every_user_once_and_shuffles_deterministically():
    rng = random.Random(2)
    ds = _dataset(_random_seqs(rng, users=23))
    seen = [u for b in iterate_batches(ds, 5, 100) for u in b.users.tolist()]
    assert seen == list(range(23))
    assert len(list(iterate_batches(ds, 5, 100))) == num_batches(23, 5) == 5
    order = lambda seed: [  # noqa: E731
        u for b in iterate_batches(ds, 5, 100, shuffle=True, generator=torch.Generator().manual_seed(seed))
        for u in b.users.tolist()
    ]
    assert sorted(order(0)) == list(range(23))
    assert order(0) == order(0)
    assert order(0) != order(1)


def test_dataset_validation_messages():
    with pytest.raises(ValueError, match="item_ids must lie in"):
        _dataset([[1, 99]], num_items=10)
    with pytest.raises(ValueError, match="offsets must be"):
        SequenceDataset(torch.tensor([1]), torch.tensor([1]), torch.tensor([0, 2]), num_items=5)
    with pytest.raises(ValueError, match="timestamps must have"):
        SequenceDataset(torch.tensor([1]), torch.tensor([1, 2]), torch.tensor([0, 1]), num_items=5)
    with pytest.raises(ValueError, match="max_seq_len"):
        make_batch(_dataset([[1]]), torch.tensor([0]), 0)
