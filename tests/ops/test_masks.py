"""The mask functions against the plain-Python rules of tests/strategies.py."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchrec_hstu.ops.masks import hstu_attention_mask, sla_attention_mask
from tests.strategies import JaggedBatch, gr_mask_rule, jagged_batches, sla_mask_rule


def _expected(batch: JaggedBatch, padded: int, rule) -> torch.Tensor:
    """``[B, padded, padded]`` with the rule on the real rows and no padded keys."""
    out = torch.zeros(len(batch.lengths), padded, padded, dtype=torch.bool)
    for b, n in enumerate(batch.lengths):
        if n:
            out[b, :n, :n] = torch.tensor(rule(b, n))
    return out


@given(
    batch=jagged_batches(),
    causal=st.booleans(),
    window=st.sampled_from([0, 1, 3]),
    min_full=st.sampled_from([0, 2]),
    extra=st.integers(0, 2),
)
def test_gr_mask_matches_rule(batch, causal, window, min_full, extra):
    padded = batch.max_seq_len + extra
    c = batch.contextual_seq_len
    mask = hstu_attention_mask(
        torch.tensor(batch.lengths, dtype=torch.int64), padded, causal=causal,
        num_targets=batch.num_targets_tensor(), max_attn_len=window, contextual_seq_len=c,
        min_full_attn_seq_len=min_full,
    )
    assert mask.shape == (len(batch.lengths), padded, padded) and mask.dtype == torch.bool

    def rule(b, n):
        t = None if batch.num_targets is None else batch.num_targets[b]
        return gr_mask_rule(n, t, c, window, min_full, causal)

    expected = _expected(batch, padded, rule)
    rows = torch.arange(padded).view(1, -1) < torch.tensor(batch.lengths).view(-1, 1)
    # Padded query rows are never read (their outputs are dropped); padded keys never valid.
    assert torch.equal(mask[rows], expected[rows])
    cols = ~rows
    assert not mask.transpose(1, 2)[cols].any()


@given(batch=jagged_batches(), k1=st.integers(0, 5), k2=st.integers(0, 5), extra=st.integers(0, 2))
def test_sla_mask_matches_interval_rule(batch, k1, k2, extra):
    padded = batch.max_seq_len + extra
    c = batch.contextual_seq_len
    mask = sla_attention_mask(
        torch.tensor(batch.lengths, dtype=torch.int64), padded, k1, k2,
        num_targets=batch.num_targets_tensor(), contextual_seq_len=c,
    )

    def rule(b, n):
        t = None if batch.num_targets is None else batch.num_targets[b]
        return sla_mask_rule(n, t, c, k1, k2)

    expected = _expected(batch, padded, rule)
    rows = torch.arange(padded).view(1, -1) < torch.tensor(batch.lengths).view(-1, 1)
    assert torch.equal(mask[rows], expected[rows])
    assert not mask.transpose(1, 2)[~rows].any()


def test_sla_targets_see_history_only_not_themselves():
    mask = sla_attention_mask(torch.tensor([6]), 6, sla_k1=1, sla_k2=0, num_targets=torch.tensor([2]))
    assert mask[0, 4].tolist() == [True] * 4 + [False, False]
    assert mask[0, 5].tolist() == [True] * 4 + [False, False]
    assert mask[0, 3].tolist() == [False, False, False, True, False, False]  # local window 1


def test_gr_targets_see_history_and_themselves():
    mask = hstu_attention_mask(torch.tensor([5]), 5, num_targets=torch.tensor([2]))
    assert mask[0, 3].tolist() == [True, True, True, True, False]
    assert mask[0, 4].tolist() == [True, True, True, False, True]
    assert not mask[0, :3, 3:].any()  # history never sees targets


@pytest.mark.parametrize("fn", ["gr", "sla"])
def test_query_positions_select_rows(fn):
    lengths = torch.tensor([7, 4, 9])
    num_targets = torch.tensor([2, 1, 3])
    positions = torch.tensor([[5, 6], [2, 3], [7, 8]])

    def build(query_positions):
        if fn == "gr":
            return hstu_attention_mask(lengths, 9, num_targets=num_targets, max_attn_len=2,
                                       contextual_seq_len=1, query_positions=query_positions)
        return sla_attention_mask(lengths, 9, 2, 1, num_targets=num_targets, query_positions=query_positions)

    full = build(None)
    rows = build(positions)
    assert rows.shape == (3, 2, 9)
    assert torch.equal(rows, torch.gather(full, 1, positions.unsqueeze(-1).expand(-1, -1, 9)))


def test_sla_negative_arguments_raise():
    with pytest.raises(ValueError, match="sla_k1, sla_k2 and contextual_seq_len must be >= 0"):
        sla_attention_mask(torch.tensor([3]), 3, -1, 0)


@pytest.mark.gpu
@given(batch=jagged_batches(), window=st.sampled_from([0, 2]), k1=st.integers(0, 3))
def test_gpu_masks_equal_cpu(batch, window, k1):
    lengths = torch.tensor(batch.lengths, dtype=torch.int64)
    targets = batch.num_targets_tensor()
    c = batch.contextual_seq_len
    for build in (
        lambda dev: hstu_attention_mask(lengths.to(dev), batch.max_seq_len, max_attn_len=window, contextual_seq_len=c,
                                        num_targets=None if targets is None else targets.to(dev)),
        lambda dev: sla_attention_mask(lengths.to(dev), batch.max_seq_len, k1, 2, contextual_seq_len=c,
                                       num_targets=None if targets is None else targets.to(dev)),
    ):
        assert torch.equal(build("cuda").cpu(), build("cpu"))
