"""Ranking batches: channel-major histories, truncation, labels by bitmask."""

import pytest
import torch

from torchrec_hstu.data.ranking import make_ranking_batch, split_users
from torchrec_hstu.data.synthetic import CLICK, LONG_VIEW, ImpressionConfig, generate_impressions


def test_make_ranking_batch_matches_oracle():
    log = generate_impressions(ImpressionConfig(num_users=30, num_items=80, history_len=10, num_candidates=3))
    users = torch.tensor([4, 0, 17])
    batch = make_ranking_batch(log, users, ["uih", "clicks", "views"], max_history_len=4)
    h = log.history_len
    expected_ids, expected_lengths = [], []
    for bits in (0, CLICK, LONG_VIEW):
        for u in users.tolist():
            kept = [
                t for t in range(h) if bits == 0 or (int(log.actions[u, t]) & bits)
            ][-4:]
            expected_ids += [int(log.item_ids[u, t]) for t in kept]
            expected_lengths.append(len(kept))
    assert batch.history_ids.tolist() == expected_ids
    assert batch.history_lengths.tolist() == expected_lengths
    assert batch.candidate_ids.tolist() == log.item_ids[users, h:].reshape(-1).tolist()
    assert batch.num_targets.tolist() == [3, 3, 3]
    assert batch.max_seq_len == max(expected_lengths) + 3
    labels = batch.labels([CLICK, LONG_VIEW])
    actions = log.actions[users, h:].reshape(-1)
    assert labels[:, 0].tolist() == [float(a & CLICK > 0) for a in actions.tolist()]
    assert labels[:, 1].tolist() == [float(a & LONG_VIEW > 0) for a in actions.tolist()]
    assert "candidate_actions" not in batch.model_inputs()


def test_ranking_batch_errors_and_split():
    log = generate_impressions(ImpressionConfig(num_users=10, num_items=20, history_len=4, num_candidates=2))
    with pytest.raises(ValueError, match="channels must be a non-empty subset"):
        make_ranking_batch(log, torch.tensor([0]), ["likes"])
    train, held = split_users(10, 0.3, seed=0)
    assert sorted(train.tolist() + held.tolist()) == list(range(10)) and held.numel() == 3
