"""SASRec baseline: shapes, causality, batch independence, SASRec's position slots, the shared
loss (sampled and full softmax) and that it learns a deterministic successor rule."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchrec_hstu.models.retrieval import HSTURetrieval, HSTURetrievalTrain
from torchrec_hstu.models.sasrec import SASRecRetrieval


def _model(num_items=30, dropout=0.0, **kw):
    torch.manual_seed(0)
    return SASRecRetrieval(num_items, embedding_dim=16, num_layers=2, num_heads=2, max_seq_len=8,
                           dropout_ratio=dropout, **kw).eval()


def _batch():
    ids = torch.tensor([3, 5, 7, 1, 2, 9, 9, 4, 8])
    lengths = torch.tensor([3, 1, 5])
    return ids, lengths, torch.zeros(9, dtype=torch.int64)


def test_scores_full_catalogue_as_cosines():
    scores = _model()(*_batch(), max_seq_len=5)
    assert scores.shape == (3, 30)
    assert float(scores.detach().abs().max()) <= 1.0 + 1e-5


def test_causal_and_independent_of_the_batch():
    model = _model()
    ids, lengths, ts = _batch()
    out, _, _ = model.encode(ids, lengths, ts, 5)
    changed = ids.clone()
    changed[8] = 20  # last token of the third sequence
    out2, _, _ = model.encode(changed, lengths, ts, 5)
    torch.testing.assert_close(out[:8], out2[:8], rtol=0, atol=1e-6)  # earlier tokens do not see it
    assert not torch.allclose(out[8], out2[8])
    alone, _, _ = model.encode(ids[4:], lengths[2:], ts[4:], 5)  # the third sequence by itself
    torch.testing.assert_close(out[4:], alone, rtol=1e-5, atol=1e-6)


def test_position_slots_are_sasrec_left_padded_window():
    # Token i of a length-n sequence uses slot max_seq_len - n + i: the latest item always sits in
    # the window's last slot (7 here); a 2-item sequence uses slots 6 and 7, never 0..5.
    model = _model()
    ids, lengths, ts = torch.tensor([4, 9]), torch.tensor([2]), torch.zeros(2, dtype=torch.int64)
    before, _, _ = model.encode(ids, lengths, ts, 2)
    with torch.no_grad():
        model.position_embeddings.weight[:6].normal_()
    unchanged, _, _ = model.encode(ids, lengths, ts, 2)
    torch.testing.assert_close(before, unchanged, rtol=0, atol=0)
    with torch.no_grad():
        model.position_embeddings.weight[7].normal_()
    changed, _, _ = model.encode(ids, lengths, ts, 2)
    torch.testing.assert_close(before[0], changed[0], rtol=0, atol=0)  # slot 6 kept, causal
    assert not torch.allclose(before[1], changed[1])


def test_full_softmax_loss_matches_an_oracle():
    model = _model()
    ids, lengths, ts = _batch()
    loss = HSTURetrievalTrain(model, temperature=0.1)(ids, lengths, ts, 5, None)
    out, _, _ = model.encode(ids, lengths, ts, 5)
    table = F.normalize(model.all_item_embeddings(), dim=-1)
    terms = []
    start = 0
    for n in lengths.tolist():
        for t in range(start, start + n - 1):
            logits = out[t] @ table.t() / 0.1
            terms.append(-F.log_softmax(logits, dim=0)[ids[t + 1]])
        start += n
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def test_full_softmax_equals_sampled_softmax_over_every_other_item():
    # Both losses of HSTURetrievalTrain agree when the sampled negatives are the whole catalogue
    # (the positive is masked out of the negatives as an accidental hit).
    torch.manual_seed(0)
    model = HSTURetrieval(12, embedding_dim=8, num_layers=1, num_heads=1, attention_dim=4, hidden_dim=4,
                          max_seq_len=6, num_gap_buckets=0, input_dropout_ratio=0.0, output_dropout_ratio=0.0).eval()
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    lengths = torch.tensor([4, 3])
    ts = torch.arange(7) * 60
    train = HSTURetrievalTrain(model, temperature=0.2)
    full = train(ids, lengths, ts, 4, None)
    sampled = train(ids, lengths, ts, 4, torch.arange(12))
    torch.testing.assert_close(full, sampled, rtol=1e-5, atol=1e-6)


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="num_heads must be > 0 and divide embedding_dim=16"):
        SASRecRetrieval(10, embedding_dim=16, num_heads=3)
    with pytest.raises(ValueError, match="num_heads must be > 0"):
        SASRecRetrieval(10, embedding_dim=16, num_heads=0)
    with pytest.raises(ValueError, match="num_items must be > 0"):
        SASRecRetrieval(0, embedding_dim=16)


def test_learns_a_successor_rule():
    # item i is always followed by (i + 1) mod N: one training pass drives HR@1 to 1.
    torch.manual_seed(0)
    n = 12
    model = SASRecRetrieval(n, embedding_dim=16, num_layers=1, num_heads=1, max_seq_len=6, dropout_ratio=0.0)
    train = HSTURetrievalTrain(model, temperature=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    starts = torch.arange(n)
    ids = torch.cat([(s + torch.arange(6)) % n for s in starts])
    lengths = torch.full((n,), 6)
    ts = torch.zeros_like(ids)
    for _ in range(60):
        loss = train(ids, lengths, ts, 6, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * math.log(n)
    model.eval()
    scores = model(ids, lengths, ts, 6)
    assert (scores.argmax(1) == (starts + 6) % n).float().mean().item() == 1.0
