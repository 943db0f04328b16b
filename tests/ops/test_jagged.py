"""Jagged helpers: round trips against per-sequence Python oracles, gradients, export."""

from typing import List

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchrec_hstu.ops.jagged import (
    concat_2D_jagged,
    dense_to_jagged,
    gather_index_from_starts,
    jagged_to_padded_dense,
    jagged_token_batch_ids,
    jagged_token_positions,
    lengths_to_offsets,
    offsets_to_lengths,
    split_2D_jagged,
)

lengths_lists = st.lists(st.sampled_from([0, 1, 2, 3, 5, 8]), min_size=0, max_size=7)


def offsets_of(lengths: List[int], dtype=torch.int64) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=dtype)


def values_for(total: int, dim: int = 3, dtype=torch.float64) -> torch.Tensor:
    return torch.arange(total * dim, dtype=dtype).reshape(total, dim) + 1.0  # no zeros


@given(lengths=lengths_lists, dtype=st.sampled_from([torch.int32, torch.int64]))
def test_lengths_offsets_round_trip(lengths, dtype):
    lengths_t = torch.tensor(lengths, dtype=dtype)
    offsets = lengths_to_offsets(lengths_t)
    assert offsets.dtype == torch.int64 and offsets.tolist() == offsets_of(lengths).tolist()
    assert offsets_to_lengths(offsets).tolist() == lengths


@given(lengths=lengths_lists)
def test_token_batch_ids_and_positions(lengths):
    offsets = offsets_of(lengths)
    batch_ids, positions = jagged_token_positions(offsets, sum(lengths))
    expected_ids = [b for b, n in enumerate(lengths) for _ in range(n)]
    expected_pos = [i for n in lengths for i in range(n)]
    assert batch_ids.tolist() == expected_ids and positions.tolist() == expected_pos
    assert jagged_token_batch_ids(offsets, sum(lengths)).tolist() == expected_ids


@pytest.mark.gpu
def test_token_batch_ids_compiled_on_cuda():
    # Inductor's CUDA searchsorted once read ``offsets[1:]`` as ``offsets[:-1]`` (torch 2.11),
    # giving the last sequence's tokens the batch index B: compiled must equal eager.
    def batch_ids_of(lengths: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return jagged_token_batch_ids(lengths_to_offsets(lengths), values.shape[0])

    compiled = torch.compile(batch_ids_of, dynamic=True, fullgraph=True)
    for lengths in ([1, 2, 1], [3, 0, 5, 2], [0, 4], [2, 0], [7]):
        lengths_t = torch.tensor(lengths, device="cuda")
        values = torch.zeros(sum(lengths), 4, device="cuda")
        want = [b for b, n in enumerate(lengths) for _ in range(n)]
        assert compiled(lengths_t, values).tolist() == want


@given(lengths=lengths_lists, extra=st.integers(0, 2), pad=st.sampled_from([0.0, -7.5]))
def test_jagged_padded_round_trip(lengths, extra, pad):
    offsets = offsets_of(lengths)
    total = sum(lengths)
    values = values_for(total)
    max_len = max(lengths + [0]) + extra
    dense = jagged_to_padded_dense(values, offsets, max_len, padding_value=pad)
    assert dense.shape == (len(lengths), max_len, 3)
    for b, n in enumerate(lengths):
        start = int(offsets[b])
        assert torch.equal(dense[b, :n], values[start : start + n])
        assert (dense[b, n:] == pad).all()
    assert torch.equal(dense_to_jagged(dense, offsets), values)
    assert torch.equal(dense_to_jagged(dense, offsets, total_len=total), values)


def test_jagged_to_padded_dense_cuts_long_sequences():
    values = values_for(5, 1)
    dense = jagged_to_padded_dense(values, torch.tensor([0, 4, 5]), 2)
    assert dense.squeeze(-1).tolist() == [[1.0, 2.0], [5.0, 0.0]]


def test_gather_index_from_starts_subset():
    index = gather_index_from_starts(torch.tensor([7, 2]), torch.tensor([2, 3]), 3, pad_index=99)
    assert index.tolist() == [[7, 8, 99], [2, 3, 4]]


@given(left=lengths_lists, data=st.data())
def test_split_concat_round_trip(left, data):
    right = data.draw(st.lists(st.sampled_from([0, 1, 2, 4]), min_size=len(left), max_size=len(left)))
    offsets_left, offsets_right = offsets_of(left), offsets_of(right)
    joined = [n + m for n, m in zip(left, right)]
    values = values_for(sum(joined))
    # Oracle: per sequence, first left[b] rows then right[b] rows.
    expected_left, expected_right, start = [], [], 0
    for n, m in zip(left, right):
        expected_left.append(values[start : start + n])
        expected_right.append(values[start + n : start + n + m])
        start += n + m
    got_left, got_right = split_2D_jagged(values, offsets_left, offsets_right)
    assert torch.equal(got_left, torch.cat(expected_left) if left else values[:0])
    assert torch.equal(got_right, torch.cat(expected_right) if left else values[:0])
    got_left2, got_right2 = split_2D_jagged(values, offsets_left, offsets_right, sum(left), sum(right))
    assert torch.equal(got_left2, got_left) and torch.equal(got_right2, got_right)
    assert torch.equal(concat_2D_jagged(got_left, got_right, offsets_left, offsets_right), values)


def test_concat_left_right_order():
    left = torch.tensor([[1.0], [2.0], [3.0]])
    right = torch.tensor([[10.0], [20.0]])
    out = concat_2D_jagged(left, right, torch.tensor([0, 1, 1, 3]), torch.tensor([0, 1, 2, 2]))
    assert out.squeeze(-1).tolist() == [1.0, 10.0, 20.0, 2.0, 3.0]


def test_gradients_flow():
    offsets = torch.tensor([0, 2, 2, 3, 7])
    values = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: jagged_to_padded_dense(x, offsets, 5), (values,))
    dense = torch.randn(4, 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: dense_to_jagged(d, offsets, 7), (dense,))
    left_offsets, right_offsets = torch.tensor([0, 1, 1, 2, 3]), torch.tensor([0, 1, 1, 1, 4])
    assert torch.autograd.gradcheck(
        lambda x: split_2D_jagged(x, left_offsets, right_offsets, 3, 4), (values,)
    )
    left = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    right = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: concat_2D_jagged(a, b, left_offsets, right_offsets), (left, right)
    )


class _JaggedRoundTrips(torch.nn.Module):
    """Every helper, with totals taken from static shapes (no host sync)."""

    def forward(self, values, offsets, prefix, prefix_offsets):
        total = values.shape[0]
        lengths = offsets_to_lengths(offsets)
        offsets2 = lengths_to_offsets(lengths)
        dense = jagged_to_padded_dense(values, offsets2, 12)
        back = dense_to_jagged(dense, offsets2, total_len=total)
        joined = concat_2D_jagged(prefix, back, prefix_offsets, offsets2)
        left, right = split_2D_jagged(joined, prefix_offsets, offsets2, prefix.shape[0], total)
        return dense, joined, left, right * 2


def test_export_with_dynamic_dims():
    from torch.export import Dim

    def inputs(lengths, prefix_lengths, seed):
        gen = torch.Generator().manual_seed(seed)
        return (
            torch.randn(sum(lengths), 3, generator=gen),
            offsets_of(lengths),
            torch.randn(sum(prefix_lengths), 3, generator=gen),
            offsets_of(prefix_lengths),
        )

    batch = Dim("batch", min=1, max=256)
    dynamic = (
        {0: Dim("total", min=2, max=8192)},
        {0: batch + 1},
        {0: Dim("prefix_total", min=2, max=8192)},
        {0: batch + 1},
    )
    module = _JaggedRoundTrips()
    exported = torch.export.export(module, inputs([3, 1, 4], [1, 2, 0], 0), dynamic_shapes=dynamic, strict=False)
    new = inputs([5, 0, 1, 12, 2], [2, 2, 0, 1, 3], 1)  # other B and L, an empty sequence
    for got, want in zip(exported.module()(*new), module(*new)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@given(left=lengths_lists, data=st.data())
def test_gpu_helpers_equal_cpu(left, data):
    right = data.draw(st.lists(st.sampled_from([0, 1, 3]), min_size=len(left), max_size=len(left)))
    offsets_left, offsets_right = offsets_of(left), offsets_of(right)
    values = values_for(sum(left) + sum(right))
    cpu = split_2D_jagged(values, offsets_left, offsets_right)
    gpu = split_2D_jagged(values.cuda(), offsets_left.cuda(), offsets_right.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    joined = concat_2D_jagged(gpu[0], gpu[1], offsets_left.cuda(), offsets_right.cuda())
    assert torch.equal(joined.cpu(), values)
    max_len = max(left + [1])
    dense = jagged_to_padded_dense(gpu[0], offsets_left.cuda(), max_len)
    assert torch.equal(dense.cpu(), jagged_to_padded_dense(cpu[0], offsets_left, max_len))
    assert torch.equal(dense_to_jagged(dense, offsets_left.cuda(), sum(left)).cpu(), cpu[0])
