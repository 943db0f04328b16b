"""Regularizers of the retrieval models (issue 21, fourth ML-100K search): item-embedding dropout
(:func:`drop_item_tokens`, ``--item-dropout``), label smoothing (``HSTURetrievalTrain(label_smoothing=)``,
``--label-smoothing``) and the range checks of those flags and ``--weight-decay``."""

import pytest
import torch
import torch.nn.functional as F

from torchrec_hstu.cli import run_cli
from torchrec_hstu.models.retrieval import HSTURetrieval, HSTURetrievalTrain, drop_item_tokens
from torchrec_hstu.models.sasrec import SASRecRetrieval


def _hstu(**kwargs) -> HSTURetrieval:
    torch.manual_seed(0)
    return HSTURetrieval(12, embedding_dim=8, num_layers=1, num_heads=1, attention_dim=4, hidden_dim=4,
                         max_seq_len=6, input_dropout_ratio=0.0, output_dropout_ratio=0.0, **kwargs)


def _sasrec() -> SASRecRetrieval:
    torch.manual_seed(0)
    return SASRecRetrieval(12, embedding_dim=8, num_layers=1, num_heads=1, max_seq_len=6, dropout_ratio=0.0)


def test_drop_item_tokens_zeroes_whole_rows_and_rescales_the_rest() -> None:
    torch.manual_seed(0)
    x = torch.randn(400, 6)
    y = drop_item_tokens(x, 0.25, training=True)
    dropped = (y == 0).all(dim=1)
    assert 60 < int(dropped.sum()) < 140  # about a quarter of 400 rows
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75)
    # Off (ratio 0 or eval): the same tensor, and no random numbers drawn.
    state = torch.get_rng_state()
    assert drop_item_tokens(x, 0.0, training=True) is x
    assert drop_item_tokens(x, 0.5, training=False) is x
    assert torch.equal(torch.get_rng_state(), state)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="item dropout"):
            drop_item_tokens(x, bad, training=True)


@pytest.mark.parametrize("make", [lambda: _hstu(item_dropout_ratio=0.5), _sasrec])
def test_item_dropout_hides_input_items_only_in_training(make) -> None:
    model = make()
    model.set_item_dropout(0.5)
    ids, lengths = torch.arange(10), torch.tensor([4, 6])
    extra_ids = torch.arange(12)
    raw = model.lookup(torch.cat([ids, extra_ids]), torch.tensor([4, 6, 12]))
    model.train()
    torch.manual_seed(1)
    inputs, extra = model.lookup_with_extra(ids, lengths, extra_ids)
    dropped = (inputs == 0).all(dim=1)
    assert 0 < int(dropped.sum()) < 10
    torch.testing.assert_close(inputs[~dropped], raw[:10][~dropped] * 2.0)
    torch.testing.assert_close(extra, raw[10:])  # targets / catalogue: never dropped
    model.eval()
    inputs, _ = model.lookup_with_extra(ids, lengths, extra_ids)
    torch.testing.assert_close(inputs, raw[:10])
    with pytest.raises(ValueError, match="item dropout"):
        model.set_item_dropout(1.0)


def test_item_dropout_refuses_the_unshifted_sampled_softmax() -> None:
    model = _hstu(item_dropout_ratio=0.2).train()
    ids, lengths, ts = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([3, 2]), torch.arange(5) * 60
    with pytest.raises(ValueError, match="shift_inputs"):
        HSTURetrievalTrain(model)(ids, lengths, ts, 3, torch.arange(6))
    for train in (HSTURetrievalTrain(model, shift_inputs=True), HSTURetrievalTrain(model)):
        loss = train(ids, lengths, ts, 3, torch.arange(6) if train.shift_inputs else None)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("make", [_hstu, _sasrec])
def test_label_smoothing_is_the_smoothed_cross_entropy_of_the_evaluated_scores(make) -> None:
    # Two-item sequences [a, b] with shift_inputs: the model reads [a] alone, so the loss is the
    # (smoothed) cross-entropy of b under the scores evaluation gives after the history [a].
    model = make().eval()
    ids, lengths, ts = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([2, 2, 2]), torch.tensor([0, 60, 0, 5, 100, 4000])
    scores = model(torch.tensor([1, 3, 5]), torch.tensor([1, 1, 1]), torch.tensor([0, 0, 100]), max_seq_len=1) / 0.2
    targets = torch.tensor([2, 4, 6])
    smoothed = HSTURetrievalTrain(model, temperature=0.2, shift_inputs=True, label_smoothing=0.3)(ids, lengths, ts, 2, None)
    torch.testing.assert_close(smoothed, F.cross_entropy(scores, targets, label_smoothing=0.3), rtol=1e-5, atol=1e-6)
    plain = HSTURetrievalTrain(model, temperature=0.2, shift_inputs=True)(ids, lengths, ts, 2, None)
    torch.testing.assert_close(plain, F.cross_entropy(scores, targets), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(smoothed, plain)
    # The unshifted full softmax smooths too.
    unshifted = HSTURetrievalTrain(model, temperature=0.2, label_smoothing=0.3)(ids, lengths, ts, 2, None)
    assert not torch.allclose(unshifted, HSTURetrievalTrain(model, temperature=0.2)(ids, lengths, ts, 2, None))


def test_label_smoothing_refuses_sampled_negatives_and_bad_values() -> None:
    model = _hstu()
    train = HSTURetrievalTrain(model, shift_inputs=True, label_smoothing=0.1)
    with pytest.raises(ValueError, match="full softmax"):
        train(torch.tensor([1, 2, 3]), torch.tensor([3]), torch.arange(3), 3, torch.arange(5))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            HSTURetrievalTrain(model, label_smoothing=bad)


@pytest.mark.parametrize("argv, words", [
    (["--weight-decay", "-0.1"], ["--weight-decay", ">= 0"]),
    (["--weight-decay", "nan"], ["--weight-decay", "finite"]),
    (["--label-smoothing", "1.0", "--loss", "full"], ["--label-smoothing", "[0, 1)"]),
    (["--label-smoothing", "0.1", "--loss", "sampled"], ["--label-smoothing", "--loss full"]),
    (["--item-dropout", "-0.5"], ["--item-dropout", "[0, 1)"]),
    (["--item-dropout", "0.2", "--loss", "sampled", "--no-shift-inputs"], ["--item-dropout", "--shift-inputs"]),
])
def test_cli_refuses_bad_regularization_flags_with_one_line(retrieval, argv, words, capsys, monkeypatch) -> None:
    monkeypatch.delenv("TORCHREC_HSTU_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(retrieval.cli, ["--data", "csv", "--data-path", "/nonexistent/never-read.csv", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err


def test_cli_flags_reach_the_model_and_the_loss(retrieval) -> None:
    args = retrieval.model_args(["--label-smoothing", "0.1", "--item-dropout", "0.2", "--weight-decay", "0.05"],
                                "sasrec", "ml-100k")
    assert (args.label_smoothing, args.item_dropout, args.weight_decay, args.loss) == (0.1, 0.2, 0.05, "full")
    defaults = retrieval.build_parser().parse_args([])
    assert (defaults.label_smoothing, defaults.item_dropout, defaults.weight_decay) == (0.0, 0.0, 0.0)
