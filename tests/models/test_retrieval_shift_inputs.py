"""HSTURetrievalTrain(shift_inputs=True): the model reads each sequence without its last item and
every position it reads, the last one included, is supervised."""

import torch
import torch.nn.functional as F

from torchrec_hstu.models.retrieval import HSTURetrieval, HSTURetrievalTrain, drop_last_tokens
from torchrec_hstu.models.sasrec import SASRecRetrieval


def _hstu(num_items: int = 12) -> HSTURetrieval:
    torch.manual_seed(0)
    return HSTURetrieval(num_items, embedding_dim=8, num_layers=1, num_heads=1, attention_dim=4, hidden_dim=4,
                         max_seq_len=6, input_dropout_ratio=0.0, output_dropout_ratio=0.0).eval()


def _sasrec(num_items: int = 12) -> SASRecRetrieval:
    torch.manual_seed(0)
    return SASRecRetrieval(num_items, embedding_dim=8, num_layers=1, num_heads=1, max_seq_len=6,
                           dropout_ratio=0.0).eval()


def test_drop_last_tokens_splits_inputs_and_targets() -> None:
    ids = torch.tensor([1, 2, 3, 9, 4, 5])
    lengths = torch.tensor([3, 1, 2])  # the one-item sequence has no target and is dropped
    ts = torch.tensor([10, 20, 30, 40, 50, 60])
    inputs, input_lengths, input_ts, targets = drop_last_tokens(ids, lengths, ts)
    assert inputs.tolist() == [1, 2, 4]
    assert input_lengths.tolist() == [2, 1]
    assert input_ts.tolist() == [10, 20, 50]
    assert targets.tolist() == [2, 3, 5]


def test_shifted_full_softmax_scores_from_the_evaluated_position() -> None:
    # With two-item sequences [a, b], the model reads [a] alone: the loss is the cross-entropy of
    # b under the scores evaluation would give after the history [a].
    for model in (_hstu(), _sasrec()):
        ids = torch.tensor([1, 2, 3, 4, 5, 6])
        lengths = torch.tensor([2, 2, 2])
        ts = torch.tensor([0, 60, 0, 5, 100, 4000])
        loss = HSTURetrievalTrain(model, temperature=0.2, shift_inputs=True)(ids, lengths, ts, 2, None)
        scores = model(torch.tensor([1, 3, 5]), torch.tensor([1, 1, 1]), torch.tensor([0, 0, 100]), max_seq_len=1)
        torch.testing.assert_close(loss, F.cross_entropy(scores / 0.2, torch.tensor([2, 4, 6])), rtol=1e-5, atol=1e-6)


def test_shifted_full_and_sampled_softmax_agree_over_the_whole_catalogue() -> None:
    model = _hstu()
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    lengths = torch.tensor([4, 3])
    ts = torch.arange(7) * 60
    train = HSTURetrievalTrain(model, temperature=0.2, shift_inputs=True)
    full = train(ids, lengths, ts, 4, None)
    sampled = train(ids, lengths, ts, 4, torch.arange(12))
    torch.testing.assert_close(full, sampled, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full, HSTURetrievalTrain(model, temperature=0.2)(ids, lengths, ts, 4, None))


def test_shifted_loss_without_targets_is_zero_and_differentiable() -> None:
    model = _hstu()
    loss = HSTURetrievalTrain(model, shift_inputs=True)(torch.tensor([1, 2]), torch.tensor([1, 1]),
                                                        torch.tensor([0, 0]), 1, None)
    loss.backward()
    assert float(loss.detach()) == 0.0
