"""RelativeBiasSTULayer / RelativeTimePositionBias (HSTU's relative position + time attention
bias) and HSTURetrieval(relative_attention_bias=True)."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchrec_hstu.models.relative_bias import (
    RelativeBiasSTULayer,
    RelativeTimePositionBias,
    relative_bias_timestamps,
    relative_time_buckets,
)
from torchrec_hstu.models.retrieval import HSTURetrieval, HSTURetrievalTrain
from torchrec_hstu.modules.stu import STULayer


def test_time_buckets_follow_gr_log_rule() -> None:
    dt = torch.tensor([0, -1, 1, 2, 3, 60, -3600, 10**9])
    expected = [min(int(math.log(max(abs(int(d)), 1)) / 0.301), 40) for d in dt]
    assert relative_time_buckets(dt, 40).tolist() == expected


def test_bias_matches_a_loop_oracle() -> None:
    torch.manual_seed(0)
    bias = RelativeTimePositionBias(max_seq_len=3, num_time_buckets=16)
    ts = torch.tensor([0, 5, 9, 100, 1, 2, 2000])
    offsets = torch.tensor([0, 4, 4, 7])  # lengths 4 (longer than max_seq_len), 0, 3
    out = bias(ts, offsets, max_seq_len=4)
    assert out.shape == (3, 4, 4)
    for b in (0, 2):
        seq = ts[offsets[b]:offsets[b + 1]]
        for i in range(len(seq)):
            for j in range(len(seq)):
                rel = max(min(i - j, 2), -2)
                bucket = min(int(math.log(max(abs(int(seq[i] - seq[j])), 1)) / 0.301), 16)
                want = bias.position_weight[rel + 2] + bias.time_weight[bucket]
                torch.testing.assert_close(out[b, i, j], want)


@pytest.mark.parametrize("uvqk_activation", ["u", "all"])
def test_zero_bias_layer_equals_the_stu_layer(uvqk_activation) -> None:
    # With both bias tables at zero the dense attention is the STU layer's own math; u, v, q, k
    # come from the same function (silu on u only, or on all four).
    torch.manual_seed(0)
    kwargs = dict(embedding_dim=16, num_heads=2, hidden_dim=8, attention_dim=4, output_dropout_ratio=0.0,
                  scaling_seqlen=6, uvqk_activation=uvqk_activation)
    reference = STULayer(**kwargs)  # type: ignore[arg-type]
    layer = RelativeBiasSTULayer(max_seq_len=6, **kwargs)  # type: ignore[arg-type]
    layer.load_state_dict(reference.state_dict(), strict=False)
    with torch.no_grad():
        layer.relative_bias.position_weight.zero_()
        layer.relative_bias.time_weight.zero_()
    x = torch.randn(9, 16)
    offsets = torch.tensor([0, 3, 4, 9])
    with relative_bias_timestamps([layer], torch.arange(9) * 60):
        got = layer(x, offsets, max_seq_len=5)
    torch.testing.assert_close(got, reference(x, offsets, max_seq_len=5), rtol=1e-5, atol=1e-6)
    assert layer.batch_timestamps is None  # handed back after the block


def test_bias_enters_the_attention_before_silu() -> None:
    # One head, one sequence of two tokens: row 1 = (silu(a s10 + r10) v0 + silu(a s11 + r11) v1) / N.
    torch.manual_seed(0)
    layer = RelativeBiasSTULayer(4, 1, 2, 2, max_seq_len=2, output_dropout_ratio=0.0, scaling_seqlen=2)
    x = torch.randn(2, 4)
    ts = torch.tensor([0, 100])
    captured = {}
    layer._output = lambda attn, u, x_: captured.setdefault("attn", attn)  # type: ignore[method-assign]
    with relative_bias_timestamps([layer], ts):
        layer(x, torch.tensor([0, 2]), max_seq_len=2)
    from torchrec_hstu.ops.hstu_compute import hstu_compute_uqvk

    _, q, k, v = hstu_compute_uqvk(x, *layer._projection())
    rab = layer.relative_bias(ts, torch.tensor([0, 2]), 2)[0]
    alpha = layer.config.alpha
    row1 = (F.silu(alpha * (q[1, 0] @ k[0, 0]) + rab[1, 0]) * v[0, 0]
            + F.silu(alpha * (q[1, 0] @ k[1, 0]) + rab[1, 1]) * v[1, 0]) / 2
    torch.testing.assert_close(captured["attn"][1], row1)


def test_layer_refuses_missing_timestamps_and_unsupported_masks() -> None:
    layer = RelativeBiasSTULayer(8, 1, 4, 4, max_seq_len=4)
    with pytest.raises(ValueError, match="relative_bias_timestamps"):
        layer(torch.randn(3, 8), torch.tensor([0, 3]), max_seq_len=3)
    with pytest.raises(ValueError, match="max_attn_len"):
        RelativeBiasSTULayer(8, 1, 4, 4, max_seq_len=4, max_attn_len=2)


def test_retrieval_model_with_relative_bias_trains_the_bias() -> None:
    torch.manual_seed(0)
    model = HSTURetrieval(20, embedding_dim=16, num_layers=2, num_heads=2, attention_dim=8, hidden_dim=8,
                          max_seq_len=8, relative_attention_bias=True)
    assert len(model.relative_bias_layers) == 2
    ids = torch.tensor([1, 2, 3, 4, 5, 6])
    lengths = torch.tensor([2, 4])
    ts = torch.tensor([0, 60, 0, 0, 100, 5000])
    loss = HSTURetrievalTrain(model, shift_inputs=True)(ids, lengths, ts, 4, None)
    loss.backward()
    for layer in model.relative_bias_layers:
        assert layer.relative_bias.time_weight.grad is not None
        assert layer.relative_bias.time_weight.grad.abs().sum() > 0
    assert model(ids, lengths, ts, 4).shape == (2, 20)
    # Timestamps matter now (they enter every layer, not only the positional encoder's buckets).
    model.eval()
    a = model(ids, lengths, ts, 4)
    b = model(ids, lengths, ts * 1000, 4)
    assert not torch.allclose(a, b)
