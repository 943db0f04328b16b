"""DLRM-HSTU ranking model: target-aware candidates, loss, config-built two-channel model."""

import os

import pytest
import torch
import torch.nn.functional as F

from torchrec_hstu.data.ranking import make_ranking_batch
from torchrec_hstu.data.synthetic import CLICK, LONG_VIEW, ImpressionConfig, generate_impressions
from torchrec_hstu.models.ranking import HSTURanking, HSTURankingTrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(embedding_dim=16, num_layers=2, num_heads=2, attention_dim=8, hidden_dim=8, max_seq_len=32,
             input_dropout_ratio=0.0, output_dropout_ratio=0.0, preprocessor_hidden_dim=16)


def _setup(channels=("uih", "clicks")):
    log = generate_impressions(ImpressionConfig(num_users=20, num_items=60, history_len=10, num_candidates=4))
    torch.manual_seed(0)
    model = HSTURanking(60, item_embedding_dim=8, channels=channels, **SMALL).eval()
    batch = make_ranking_batch(log, torch.tensor([1, 5, 7]), list(channels))
    return log, model, batch


def test_candidates_are_permutation_equivariant():
    """Target-aware attention: candidates see the history and themselves, not each other."""
    _, model, batch = _setup()
    inputs = batch.model_inputs()
    logits = model(**inputs)
    assert logits.shape == (12, 2)
    perm = torch.tensor([3, 1, 0, 2, 4, 5, 6, 7, 9, 8, 11, 10])  # within each user's 4 candidates
    permuted = dict(inputs, candidate_ids=inputs["candidate_ids"][perm])
    torch.testing.assert_close(model(**permuted), logits[perm], rtol=1e-5, atol=1e-6)
    # Changing one candidate changes only its own logits.
    changed = dict(inputs, candidate_ids=inputs["candidate_ids"].clone())
    changed["candidate_ids"][5] = 59
    out = model(**changed)
    keep = torch.arange(12) != 5
    torch.testing.assert_close(out[keep], logits[keep], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[5], logits[5])


def test_history_actions_matter_and_candidate_labels_are_not_inputs():
    _, model, batch = _setup()
    inputs = batch.model_inputs()
    logits = model(**inputs)
    flipped = dict(inputs, history_actions=inputs["history_actions"] ^ CLICK)
    assert not torch.allclose(model(**flipped), logits)
    assert "candidate_actions" not in inputs


def test_loss_is_mean_bce_over_tasks():
    _, model, batch = _setup()
    labels = batch.labels([CLICK, LONG_VIEW])
    loss, logits = HSTURankingTrain(model, task_weights=[2.0, 1.0])(labels, **batch.model_inputs())
    per_task = [F.binary_cross_entropy_with_logits(logits[:, i], labels[:, i]).item() for i in range(2)]
    assert loss.item() == pytest.approx((2 * per_task[0] + per_task[1]) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="task_weights"):
        HSTURankingTrain(model, task_weights=[1.0])


def test_input_errors():
    _, model, batch = _setup()
    inputs = batch.model_inputs()
    with pytest.raises(ValueError, match=r"history_lengths must be \[K \* B\]"):
        model(**dict(inputs, history_lengths=inputs["history_lengths"][:3]))
    with pytest.raises(ValueError, match="must not be 'items'"):
        HSTURanking(10, item_embedding_dim=8, table_name="items", **SMALL)


def test_two_channel_model_from_pbtxt():
    from torchrec_hstu.config import build_multi_channel, load_config

    cfg = load_config(os.path.join(REPO, "examples", "configs", "ranking_two_channel.pbtxt"))
    encoder = build_multi_channel(cfg)
    model = HSTURanking(60, item_embedding_dim=cfg.item_embedding_dim, encoder=encoder,
                        task_names=[t.task_name for t in cfg.tasks]).eval()
    assert len(model.channels) == 2
    log = generate_impressions(ImpressionConfig(num_users=8, num_items=60, history_len=10, num_candidates=3))
    batch = make_ranking_batch(log, torch.arange(4), model.channels)
    logits = model(**batch.model_inputs())
    assert logits.shape == (12, len(cfg.tasks))
    assert torch.isfinite(logits).all()
