"""The built-in synthetic data sets: determinism and the planted structure."""

import numpy as np
import torch

from torchrec_hstu.data.sequences import iterate_batches, leave_last_out
from torchrec_hstu.data.synthetic import (
    CLICK,
    LONG_VIEW,
    MINUTE,
    HOUR,
    ImpressionConfig,
    RingSequenceConfig,
    generate_impressions,
    generate_ring_sequences,
    ring_membership,
)
from torchrec_hstu.models.baselines import FirstOrderMarkov, MostPopular
from torchrec_hstu.models.metrics import RankAccumulator

SMALL = RingSequenceConfig(num_users=300, num_items=400, num_clusters=8, ring_len=60, min_len=8, max_len=20)


def test_ring_sequences_are_deterministic_per_seed():
    a = generate_ring_sequences(SMALL).dataset
    b = generate_ring_sequences(SMALL).dataset
    c = generate_ring_sequences(RingSequenceConfig(**{**SMALL.__dict__, "seed": 1})).dataset
    assert torch.equal(a.item_ids, b.item_ids) and torch.equal(a.timestamps, b.timestamps)
    assert torch.equal(a.offsets, b.offsets)
    assert not torch.equal(a.item_ids[:200], c.item_ids[:200])


def test_ring_sequences_follow_the_planted_rule():
    """Re-derive every on-ring item from the hidden rings, clusters and gaps."""
    out = generate_ring_sequences(SMALL)
    ds = out.dataset
    lengths = ds.lengths
    assert int(lengths.min()) >= SMALL.min_len and int(lengths.max()) <= SMALL.max_len
    on_ring = out.on_ring
    for u in range(ds.num_users):
        ids, ts = (x.tolist() for x in ds.user(u))
        start = int(ds.offsets[u])
        assert all(b >= a for a, b in zip(ts, ts[1:]))
        ring = out.rings[out.clusters[u]].tolist()
        position = ring.index(ids[0])
        assert on_ring[start]
        for t in range(1, len(ids)):
            gap_before_previous = ts[t - 1] - ts[t - 2] if t >= 2 else None
            quick = gap_before_previous is not None and gap_before_previous < 30 * MINUTE
            if on_ring[start + t]:
                position = (position + (1 if quick else 2)) % SMALL.ring_len
                assert ids[t] == ring[position]
            gap = ts[t] - ts[t - 1]
            assert MINUTE <= gap < 30 * MINUTE or 3 * HOUR <= gap < 48 * HOUR
    noise_rate = 1.0 - on_ring.mean()
    assert abs(noise_rate - SMALL.noise) < 0.03


def test_structure_defeats_popularity_and_markov_but_not_an_oracle():
    """An oracle that knows the hidden state beats both baselines by far on the held-out item."""
    config = RingSequenceConfig(num_users=1500, num_items=1000, num_clusters=20, ring_len=80, min_len=10, max_len=25)
    out = generate_ring_sequences(config)
    split = leave_last_out(out.dataset)
    results = {}
    for baseline in (MostPopular(split.train), FirstOrderMarkov(split.train)):
        acc = RankAccumulator()
        for batch in iterate_batches(split.train, 512, 100):
            acc.update(baseline.scores(batch), split.test_targets[batch.users])
        results[baseline.name] = acc.compute()["HR@10"]
    # Oracle: last on-ring item's ring position + the step given by the gap before the last item.
    hits = 0
    on_ring = out.on_ring
    for u in range(out.dataset.num_users):
        ids, ts = (x.tolist() for x in out.dataset.user(u))
        start = int(out.dataset.offsets[u])
        ring = out.rings[out.clusters[u]].tolist()
        last_on = max(t for t in range(len(ids) - 1) if on_ring[start + t])
        quick = len(ids) >= 3 and ts[-2] - ts[-3] < 30 * MINUTE
        guess = ring[(ring.index(ids[last_on]) + (1 if quick else 2)) % config.ring_len]
        hits += guess == ids[-1]
    oracle_hr1 = hits / out.dataset.num_users
    assert oracle_hr1 > 1.0 - config.noise - 0.05
    assert results["most-popular"] < results["markov-1st-order"] < oracle_hr1 - 0.2
    # Popular items lie on many rings: the last item alone is ambiguous.
    membership = ring_membership(out.rings, config.num_items)
    assert membership.max() >= config.num_clusters // 2 and np.median(membership[membership > 0]) <= 2


def test_impressions_are_deterministic_and_consistent():
    config = ImpressionConfig(num_users=200, num_items=300, history_len=12, num_candidates=4)
    a, b = generate_impressions(config), generate_impressions(config)
    assert torch.equal(a.item_ids, b.item_ids) and torch.equal(a.actions, b.actions)
    assert a.item_ids.shape == (200, 16) and a.num_candidates == 4
    long_view = (a.actions & LONG_VIEW) > 0
    assert not bool((long_view & ((a.actions & CLICK) == 0)).any()), "a long view is always a click"
    h = config.history_len
    assert bool((a.timestamps[:, 1 : h + 1] > a.timestamps[:, :h]).all())
    assert bool((a.timestamps[:, h:] == a.timestamps[:, h : h + 1]).all()), "candidates share the request time"
    # The planted preference shows in the data: clicks are more frequent on liked topics.
    topics = a.item_topics[a.item_ids]
    prefs = a.user_preferences.gather(1, topics)
    click = ((a.actions & CLICK) > 0).float()
    assert click[prefs > 0].mean() > click[prefs < 0].mean() + 0.3
    assert bool((a.probabilities[..., 1] <= a.probabilities[..., 0]).all())
