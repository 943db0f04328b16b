"""HSTU retrieval model: shapes, causality, batch independence, the loss, and that it learns."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchrec_hstu.data.sequences import iterate_batches, leave_last_out
from torchrec_hstu.data.synthetic import RingSequenceConfig, generate_ring_sequences
from torchrec_hstu.models.baselines import MostPopular
from torchrec_hstu.models.metrics import RankAccumulator
from torchrec_hstu.models.retrieval import (
    HSTURetrieval,
    HSTURetrievalTrain,
    gap_buckets,
    sample_negatives,
)

SMALL = dict(embedding_dim=16, num_layers=2, num_heads=2, attention_dim=8, hidden_dim=8, max_seq_len=16)


def _model(num_items=40, **kw):
    torch.manual_seed(0)
    return HSTURetrieval(num_items, **{**SMALL, "input_dropout_ratio": 0.0, "output_dropout_ratio": 0.0, **kw}).eval()


def _batch():
    ids = torch.tensor([3, 5, 7, 1, 2, 9, 9, 4, 8])
    lengths = torch.tensor([3, 1, 5])
    ts = torch.tensor([0, 60, 4000, 10, 0, 30, 90, 100_000, 100_060])
    return ids, lengths, ts


def test_forward_scores_full_catalogue():
    model = _model()
    ids, lengths, ts = _batch()
    scores = model(ids, lengths, ts, max_seq_len=5)
    assert scores.shape == (3, 40)
    assert float(scores.detach().abs().max()) <= 1.0 + 1e-5  # cosine similarities
    users = model.user_embeddings(ids, lengths, ts, 5)
    torch.testing.assert_close(scores, users @ F.normalize(model.embedding_collection.embeddings["item_table"].weight, dim=-1).t())


def test_outputs_are_causal_in_item_ids():
    """Changing a later item leaves earlier positions' outputs unchanged."""
    model = _model()
    ids, lengths, ts = _batch()
    out, _, _ = model.encode(ids, lengths, ts, 5)
    changed = ids.clone()
    changed[8] = 30  # last token of the third sequence
    out2, _, _ = model.encode(changed, lengths, ts, 5)
    torch.testing.assert_close(out[:8], out2[:8])
    assert not torch.allclose(out[8], out2[8])


def test_user_embedding_independent_of_batch():
    """scaling_seqlen is fixed, so a user's output does not depend on the other sequences."""
    model = _model()
    ids, lengths, ts = _batch()
    together = model.user_embeddings(ids, lengths, ts, 5)
    alone = model.user_embeddings(ids[4:], lengths[2:], ts[4:], 5)
    torch.testing.assert_close(together[2:], alone, rtol=1e-5, atol=1e-6)


def test_gap_buckets_oracle():
    ts = torch.tensor([100, 101, 101, 1125, 7, 7 + 3600])
    offsets = torch.tensor([0, 4, 4, 6])
    expected = []
    for start, end in ((0, 4), (4, 6)):
        for t in range(start, end):
            if t == start:
                expected.append(0)
            else:
                gap = max(int(ts[t] - ts[t - 1]), 1)
                expected.append(1 + min(int(math.floor(math.log2(gap))), 30))
    assert gap_buckets(ts, offsets, 32).tolist() == expected
    assert gap_buckets(ts, offsets, 4).max().item() == 3


def test_sampled_softmax_loss_matches_manual():
    model = _model()
    train = HSTURetrievalTrain(model, temperature=0.1)
    ids, lengths, ts = _batch()
    negatives = torch.tensor([5, 11, 12, 9])
    log_q = torch.log(torch.tensor([0.5, 1.0, 2.0, 1.0]))
    loss = train(ids, lengths, ts, 5, negatives, log_q)
    out, _, _ = model.encode(ids, lengths, ts, 5)
    table = model.embedding_collection.embeddings["item_table"].weight
    losses = []
    start = 0
    for n in lengths.tolist():
        for t in range(start, start + n - 1):
            u = out[t]
            target = int(ids[t + 1])
            logits = [float(u @ F.normalize(table[target], dim=0)) / 0.1]
            for j, neg in enumerate(negatives.tolist()):
                if neg != target:
                    logits.append(float(u @ F.normalize(table[neg], dim=0)) / 0.1 - float(log_q[j]))
            logits = torch.tensor(logits, dtype=torch.float64)
            losses.append(-(logits[0] - torch.logsumexp(logits, 0)).item())
        start += n
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_sample_negatives():
    g = torch.Generator().manual_seed(0)
    ids, log_q = sample_negatives("uniform", 64, 10, torch.tensor([1, 2]), g)
    assert ids.shape == (64,) and log_q is None and int(ids.max()) < 10
    batch = torch.tensor([7, 7, 7, 1])
    ids, log_q = sample_negatives("in_batch", 32, 10, batch, g)
    assert set(ids.tolist()) <= {1, 7}
    # q(7) = 3/4 per draw, times R = 32 draws.
    for i, q in zip(ids.tolist(), log_q.tolist()):
        assert q == pytest.approx(math.log(32 * (0.75 if i == 7 else 0.25)), rel=1e-5)
    ids, log_q = sample_negatives("mixed", 8, 10, batch, g)
    for i, q in zip(ids.tolist(), log_q.tolist()):
        freq = {7: 0.75, 1: 0.25}.get(i, 0.0)
        assert q == pytest.approx(math.log(4 / 10 + 4 * freq), rel=1e-5)
    with pytest.raises(ValueError, match="strategy must be one of"):
        sample_negatives("hard", 8, 10, batch, g)


def test_constructor_errors():
    with pytest.raises(ValueError, match="must not be 'items'"):
        HSTURetrieval(10, table_name="items", **SMALL)
    with pytest.raises(ValueError, match="num_items"):
        HSTURetrieval(0, **SMALL)


def test_hstu_beats_popularity_on_small_builtin_data():
    """A few seconds of training beat the most-popular baseline on held-out items."""
    config = RingSequenceConfig(num_users=400, num_items=120, num_clusters=4, ring_len=40, min_len=8, max_len=16, seed=3)
    split = leave_last_out(generate_ring_sequences(config).dataset)
    torch.manual_seed(0)
    model = HSTURetrieval(120, embedding_dim=32, num_layers=1, num_heads=2, attention_dim=16, hidden_dim=16,
                          max_seq_len=16, input_dropout_ratio=0.0, output_dropout_ratio=0.0)
    train = HSTURetrievalTrain(model)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        for batch in iterate_batches(split.train, 32, 16, shuffle=True, generator=g):
            negatives, log_q = sample_negatives("uniform", 64, 120, batch.item_ids, g)
            loss = train(batch.item_ids, batch.lengths, batch.timestamps, batch.max_seq_len, negatives, log_q)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def evaluate(score_fn):
        acc = RankAccumulator()
        for batch in iterate_batches(split.train, 200, 16):
            acc.update(score_fn(batch), split.test_targets[batch.users])
        return acc.compute()

    model.eval()
    with torch.no_grad():
        hstu = evaluate(lambda b: model(b.item_ids, b.lengths, b.timestamps, b.max_seq_len))
    popular = evaluate(MostPopular(split.train).scores)
    assert hstu["HR@10"] > popular["HR@10"] + 0.15, (hstu, popular)
    assert hstu["NDCG@10"] > popular["NDCG@10"] + 0.08, (hstu, popular)


def test_user_embeddings_refuse_an_empty_history():
    model = _model()
    with pytest.raises(ValueError, match="lengths must be >= 1"):
        model.user_embeddings(torch.tensor([1, 2, 3]), torch.tensor([3, 0]), torch.tensor([10, 20, 30]), max_seq_len=3)
