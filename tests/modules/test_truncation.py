"""compute_truncation_plan (from host facts, or reading them: ``_sync``) against a per-sequence Python oracle."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchrec_hstu.ops.common import JaggedBatchFacts
from torchrec_hstu.ops.truncation import compute_truncation_plan, compute_truncation_plan_sync, truncated_lengths
from tests.strategies import jagged_batches


def oracle_keep(lengths, targets, c, tail):
    """Old token rows kept: [prefix c | the last `tail` history tokens | all targets]."""
    keep, new_lengths, start = [], [], 0
    for b, n in enumerate(lengths):
        t = 0 if targets is None else targets[b]
        prefix = list(range(start, start + min(c, n)))
        history = list(range(start + min(c, n), start + max(n - t, min(c, n))))
        target_rows = list(range(start + max(n - t, min(c, n)), start + n))
        rows = prefix + history[max(len(history) - tail, 0):] + target_rows
        keep += rows
        new_lengths.append(len(rows))
        start += n
    return keep, new_lengths


@given(batch=jagged_batches(), tail=st.integers(0, 6))
def test_plan_matches_oracle(batch, tail):
    c = batch.contextual_seq_len
    plan = compute_truncation_plan_sync(batch.seq_offsets, batch.num_targets_tensor(), tail, contextual_seq_len=c)
    keep, new_lengths = oracle_keep(batch.lengths, batch.num_targets, c, tail)
    assert truncated_lengths(batch.lengths, batch.num_targets, tail, c) == tuple(new_lengths)
    assert plan.new_facts.lengths == tuple(new_lengths) and plan.new_facts.total_len == len(keep)
    assert plan.keep_index.tolist() == keep
    assert plan.new_offsets.tolist() == torch.tensor([0] + new_lengths).cumsum(0).tolist()
    assert plan.dropped.tolist() == [n - m for n, m in zip(batch.lengths, new_lengths)]
    assert plan.new_max_seq_len == max(new_lengths)
    values = torch.arange(batch.total_len * 2).reshape(-1, 2)
    assert torch.equal(plan.apply(values), values[keep])


def test_no_history_is_dropped_when_short():
    plan = compute_truncation_plan_sync(torch.tensor([0, 3, 5]), torch.tensor([1, 2]), tail_len=5)
    assert plan.keep_index.tolist() == [0, 1, 2, 3, 4] and plan.dropped.tolist() == [0, 0]


def test_negative_arguments_raise():
    with pytest.raises(ValueError, match="tail_len and contextual_seq_len must be >= 0"):
        compute_truncation_plan(torch.tensor([0, 3]), None, tail_len=-1)


def test_plan_from_facts_reads_nothing_and_needs_facts_in_eager(monkeypatch):
    offsets, targets = torch.tensor([0, 6, 8]), torch.tensor([1, 1])
    facts = JaggedBatchFacts(lengths=(6, 2), num_targets=(1, 1), max_seq_len=6)

    def no_read(*args, **kwargs):
        raise AssertionError("host read")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, no_read)
        plan = compute_truncation_plan(offsets, targets, tail_len=2, facts=facts)
    assert plan.keep_index.tolist() == [3, 4, 5, 6, 7] and plan.new_max_seq_len == 3
    assert plan.new_facts == JaggedBatchFacts(lengths=(3, 2), num_targets=(1, 1), max_seq_len=3)
    with pytest.raises(ValueError, match="needs the batch's facts"):
        compute_truncation_plan(offsets, targets, tail_len=2)
    with pytest.raises(ValueError, match="facts describe 2 sequences with num_targets"):
        compute_truncation_plan(offsets, None, tail_len=2, facts=facts)
