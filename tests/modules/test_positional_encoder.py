"""HSTUPositionalEncoder: index and bucket math against per-token Python."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchrec_hstu.modules import HSTUPositionalEncoder
from tests.strategies import jagged_batches


def oracle_indices(lengths, targets, c, num_positions, timestamps, fn, increments, num_time):
    positions, buckets, start = [], [], 0
    for b, n in enumerate(lengths):
        high = n - (0 if targets is None else targets[b])
        last = timestamps[start + n - 1] if n else 0
        for i in range(n):
            index = i if i < c else high - min(i, high) + c
            positions.append(min(index, num_positions - 1))
            dt = max(last - timestamps[start + i], 1e-6) / increments
            f = math.sqrt(dt) if fn == "sqrt" else math.log(dt)
            buckets.append(min(max(int(f), 0), num_time))  # int() truncates toward zero
        start += n
    return positions, buckets


@given(
    batch=jagged_batches(),
    num_positions=st.sampled_from([2, 4, 50]),
    num_time=st.sampled_from([1, 3, 100]),
    fn=st.sampled_from(["sqrt", "log"]),
    increments=st.sampled_from([1.0, 60.0]),
    data=st.data(),
)
def test_indices_match_oracle(batch, num_positions, num_time, fn, increments, data):
    c = batch.contextual_seq_len
    enc = HSTUPositionalEncoder(num_positions, num_time, embedding_dim=4, contextual_seq_len=c,
                                time_bucket_fn=fn, time_bucket_increments=increments)
    timestamps = sorted(data.draw(st.lists(st.integers(0, 10**6), min_size=batch.total_len, max_size=batch.total_len)))
    ts = torch.tensor(timestamps, dtype=torch.int64)
    offsets = batch.seq_offsets
    positions, buckets = oracle_indices(batch.lengths, batch.num_targets, c, num_positions, timestamps,
                                        fn, increments, num_time)
    assert enc.position_index(offsets, batch.total_len, batch.num_targets_tensor()).tolist() == positions
    assert enc.time_bucket(offsets, ts).tolist() == buckets
    x = torch.randn(batch.total_len, 4)
    out = enc(x, offsets, ts, batch.num_targets_tensor())
    expected = x * 2.0 + enc.position_embeddings[positions] + enc.timestamp_embeddings[buckets]
    torch.testing.assert_close(out, expected)


def test_known_values():
    # One sequence: contextual 1, 3 history, 2 targets; 60 s units, sqrt buckets.
    enc = HSTUPositionalEncoder(num_position_buckets=4, num_time_buckets=5, embedding_dim=2, contextual_seq_len=1)
    offsets = torch.tensor([0, 6])
    assert enc.position_index(offsets, 6, torch.tensor([2])).tolist() == [0, 3, 3, 2, 1, 1]
    last = 100_000
    ts = torch.tensor([last - 60 * 1000, last - 60 * 9, last - 60 * 16, last - 60 * 4 - 30, last, last])
    # dt in minutes: 1000, 9, 16, 4.5, 0, 0 -> sqrt: 31.6 (clamped to 5), 3, 4, 2.1, 0, 0
    assert enc.time_bucket(offsets, ts).tolist() == [5, 3, 4, 2, 0, 0]


def test_no_time_encoding_and_gradients():
    enc = HSTUPositionalEncoder(8, 0, embedding_dim=3, use_time_encoding=False)
    x = torch.randn(5, 3, requires_grad=True)
    out = enc(x, torch.tensor([0, 2, 5]))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, math.sqrt(3)))
    used = enc.position_embeddings.grad.abs().sum(1) > 0
    assert used.tolist() == [False, True, True, True, False, False, False, False]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_position_buckets=0), "num_position_buckets must be > 0"),
        (dict(num_time_buckets=0), "num_time_buckets must be > 0"),
        (dict(time_bucket_fn="cube"), "time_bucket_fn must be one of"),
        (dict(time_bucket_increments=0.0), "time_bucket_increments must be > 0"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HSTUPositionalEncoder(**{**dict(num_position_buckets=4, num_time_buckets=4, embedding_dim=2), **kwargs})


def test_forward_errors():
    enc = HSTUPositionalEncoder(4, 4, embedding_dim=2)
    with pytest.raises(ValueError, match=r"seq_embeddings must be \[L, 2\]"):
        enc(torch.randn(3, 3), torch.tensor([0, 3]), torch.zeros(3))
    with pytest.raises(ValueError, match=r"seq_timestamps must be \[L\]=\[3\]"):
        enc(torch.randn(3, 2), torch.tensor([0, 3]))


@pytest.mark.gpu
def test_gpu_matches_cpu():
    enc = HSTUPositionalEncoder(6, 7, embedding_dim=4, contextual_seq_len=1)
    offsets = torch.tensor([0, 4, 4, 9])
    ts = torch.tensor([0, 10, 500, 9000, 0, 60, 61, 70000, 70001])
    x = torch.randn(9, 4)
    nt = torch.tensor([1, 0, 2])
    cpu = enc(x, offsets, ts, nt)
    gpu = enc.cuda()(x.cuda(), offsets.cuda(), ts.cuda(), nt.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu)
