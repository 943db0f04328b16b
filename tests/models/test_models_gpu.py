"""Dense part on CUDA, item table on CPU (no fbgemm CUDA ops needed): same results as on CPU."""

import pytest
import torch

from torchrec_hstu.data.ranking import make_ranking_batch
from torchrec_hstu.data.synthetic import CLICK, LONG_VIEW, ImpressionConfig, generate_impressions
from torchrec_hstu.models.ranking import HSTURanking, HSTURankingTrain
from torchrec_hstu.models.retrieval import HSTURetrieval, HSTURetrievalTrain

SMALL = dict(embedding_dim=16, num_layers=2, num_heads=2, attention_dim=8, hidden_dim=8, max_seq_len=16,
             input_dropout_ratio=0.0, output_dropout_ratio=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["PYTORCH", "AUTO"])
def test_retrieval_on_cuda_matches_cpu(cuda_device, kernel):
    torch.manual_seed(0)
    model = HSTURetrieval(40, kernel=kernel, **SMALL).eval()
    ids = torch.tensor([3, 5, 7, 1, 2, 9, 9, 4, 8])
    lengths = torch.tensor([3, 1, 5])
    ts = torch.tensor([0, 60, 4000, 10, 0, 30, 90, 100_000, 100_060])
    expected = model(ids, lengths, ts, 5)
    model.place(cuda_device)
    assert model.embedding_device().type == "cpu" and model.dense_device().type == "cuda"
    scores = model(ids, lengths, ts, 5)
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), expected, rtol=1e-3, atol=1e-3)
    model.train()
    loss = HSTURetrievalTrain(model)(ids, lengths, ts, 5, torch.tensor([11, 12, 13]))
    loss.backward()
    table = model.embedding_collection.embeddings["item_table"].weight
    assert table.grad is not None and table.grad.device.type == "cpu"
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in model.transducer.parameters()
               if p.requires_grad and p.grad is not None)


@pytest.mark.gpu
def test_ranking_on_cuda_matches_cpu(cuda_device):
    log = generate_impressions(ImpressionConfig(num_users=10, num_items=60, history_len=10, num_candidates=4))
    torch.manual_seed(0)
    model = HSTURanking(60, item_embedding_dim=8, channels=("uih", "clicks"), preprocessor_hidden_dim=16,
                        **{**SMALL, "max_seq_len": 32}).eval()
    batch = make_ranking_batch(log, torch.arange(4), model.channels)
    expected = model(**batch.model_inputs())
    model.place(cuda_device)
    logits = model(**batch.model_inputs())
    assert logits.device.type == "cuda"
    torch.testing.assert_close(logits.cpu(), expected, rtol=1e-3, atol=1e-3)
    loss, _ = HSTURankingTrain(model)(batch.labels([CLICK, LONG_VIEW]), **batch.model_inputs())
    loss.backward()
