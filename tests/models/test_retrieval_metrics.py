"""HR@K / NDCG@K / MRR and the baselines vs hand computations."""

import math

import pytest
import torch

from torchrec_hstu.data.sequences import SequenceDataset, make_batch
from torchrec_hstu.models.baselines import FirstOrderMarkov, MostPopular
from torchrec_hstu.models.metrics import RankAccumulator, metrics_from_ranks, target_ranks


def test_metrics_by_hand():
    # Target item 2 in each row; ranks worked out by hand: 0, 3 (three items above), 11.
    scores = torch.tensor(
        [
            [0.1, 0.2, 0.9, 0.3] + [0.0] * 10,
            [0.5, 0.6, 0.4, 0.7] + [0.0] * 10,
            [1.0] * 2 + [0.05] + [1.0] * 9 + [0.0, 0.0],
        ]
    )
    targets = torch.tensor([2, 2, 2])
    assert target_ranks(scores, targets).tolist() == [0, 3, 11]
    m = metrics_from_ranks(torch.tensor([0, 3, 11]), ks=(1, 10, 50))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@10"] == pytest.approx(2 / 3)
    assert m["HR@50"] == pytest.approx(1.0)
    assert m["NDCG@10"] == pytest.approx((1.0 + 1.0 / math.log2(5)) / 3)
    assert m["NDCG@50"] == pytest.approx((1.0 + 1.0 / math.log2(5) + 1.0 / math.log2(13)) / 3)
    assert m["MRR"] == pytest.approx((1.0 + 1 / 4 + 1 / 12) / 3)


def test_ties_count_for_the_target_and_accumulator():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [0]
    acc = RankAccumulator(ks=(1,))
    acc.update(scores, torch.tensor([3]))
    acc.update(scores, torch.tensor([0]))
    assert acc.ranks().tolist() == [3, 0]
    assert acc.compute()["HR@1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="scores must be"):
        target_ranks(torch.zeros(3), torch.tensor([0]))


def _dataset(seqs, num_items):
    ids = [i for s in seqs for i in s]
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    return SequenceDataset(torch.tensor(ids), torch.zeros(len(ids), dtype=torch.int64), torch.tensor(offsets), num_items)


def test_baselines_by_hand():
    seqs = [[0, 1, 2, 1], [1, 2, 0], [3, 1, 2], [2]]
    ds = _dataset(seqs, num_items=5)
    pop = MostPopular(ds)
    assert pop.counts.tolist() == [2, 4, 4, 1, 0]
    markov = FirstOrderMarkov(ds)
    # Transitions by hand: 0->1 x1, 1->2 x3, 2->1 x1, 2->0 x1, 3->1 x1 (none across users).
    assert markov.transition_counts(1).tolist() == [0, 0, 3, 0, 0]
    assert markov.transition_counts(2).tolist() == [1, 1, 0, 0, 0]
    assert markov.transition_counts(4).tolist() == [0] * 5
    batch = make_batch(ds, torch.tensor([0, 1, 3]), max_seq_len=10)  # last items 1, 0, 2
    scores = markov.scores(batch)
    tie = torch.tensor([2, 4, 4, 1, 0], dtype=torch.float32) / 5.0
    expected = torch.stack([tie + torch.tensor([0, 0, 3.0, 0, 0]), tie + torch.tensor([0, 1.0, 0, 0, 0]),
                            tie + torch.tensor([1.0, 1.0, 0, 0, 0])])
    torch.testing.assert_close(scores, expected)
    assert pop.scores(batch).shape == (3, 5)
