"""Input preprocessor and output postprocessors against their formulas written in the test."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchrec_hstu.modules import (
    ActionEncoder,
    ContextualPreprocessor,
    L2NormPostprocessor,
    LayerNormPostprocessor,
    TimestampLayerNormPostprocessor,
)


def content_mlp_by_hand(pre: ContextualPreprocessor, x: torch.Tensor) -> torch.Tensor:
    lin1, swish, lin2, norm = pre.content_mlp
    h = x @ lin1.weight.T + lin1.bias
    h = h * torch.sigmoid(F.layer_norm(h, h.shape[-1:], swish.norm.weight, swish.norm.bias, 1e-5))
    h = h @ lin2.weight.T + lin2.bias
    return F.layer_norm(h, h.shape[-1:], norm.weight, norm.bias, norm.eps)


def test_content_mlp_only():
    torch.manual_seed(0)
    pre = ContextualPreprocessor(5, 6, 7)
    x = torch.randn(4, 5)
    offsets = torch.tensor([0, 1, 4])
    out = pre(x, offsets, max_seq_len=3, seq_timestamps=torch.arange(4), num_targets=torch.tensor([1, 1]))
    torch.testing.assert_close(out.seq_embeddings, content_mlp_by_hand(pre, x))
    assert out.seq_offsets is offsets and out.max_seq_len == 3
    assert out.seq_timestamps.tolist() == [0, 1, 2, 3] and out.num_targets.tolist() == [1, 1]


def test_contextual_tokens_prepended_with_zero_timestamps():
    torch.manual_seed(0)
    c, feat = 2, 3
    pre = ContextualPreprocessor(5, 6, 7, contextual_feature_dim=feat, max_contextual_seq_len=c)
    with torch.no_grad():
        pre.contextual_bias.uniform_(-1, 1)
    x = torch.randn(4, 5)
    offsets = torch.tensor([0, 3, 3, 4])  # one empty sequence
    ctx = torch.randn(3, c, feat)
    ts = torch.tensor([5, 6, 7, 8])
    out = pre(x, offsets, 3, seq_timestamps=ts, contextual_embeddings=ctx, num_targets=torch.tensor([1, 0, 1]))
    content = content_mlp_by_hand(pre, x)
    rows, stamps = [], []
    for b in range(3):
        for p in range(c):
            rows.append(ctx[b, p] @ pre.contextual_weight[p] + pre.contextual_bias[p])
            stamps.append(0)
        for i in range(int(offsets[b]), int(offsets[b + 1])):
            rows.append(content[i])
            stamps.append(int(ts[i]))
    torch.testing.assert_close(out.seq_embeddings, torch.stack(rows))
    assert out.seq_timestamps.tolist() == stamps
    assert out.seq_offsets.tolist() == [0, 5, 7, 10] and out.max_seq_len == 3 + c
    assert out.num_targets.tolist() == [1, 0, 1]


def test_action_encoder_rows():
    enc = ActionEncoder(action_embedding_dim=2, action_weights=[1, 4])
    actions = torch.tensor([0, 1, 4, 5, 5])
    is_target = torch.tensor([False, False, False, False, True])
    out = enc(actions, is_target)
    e0, e1 = enc.action_embeddings
    zero = torch.zeros(2)
    expected = torch.stack([
        torch.cat([zero, zero]), torch.cat([e0, zero]), torch.cat([zero, e1]), torch.cat([e0, e1]),
        enc.target_embedding,  # a target never shows its own actions
    ])
    torch.testing.assert_close(out, expected)


def test_preprocessor_with_action_encoder_marks_targets():
    torch.manual_seed(0)
    pre = ContextualPreprocessor(3, 4, 5, action_embedding_dim=2, action_weights=[1, 2])
    x = torch.randn(5, 3)
    offsets = torch.tensor([0, 3, 5])
    actions = torch.tensor([1, 2, 3, 3, 0])
    out = pre(x, offsets, 3, num_targets=torch.tensor([1, 2]), seq_actions=actions)
    is_target = torch.tensor([False, False, True, True, True])
    expected = content_mlp_by_hand(pre, x) + pre.action_mlp(pre.action_encoder(actions, is_target))
    torch.testing.assert_close(out.seq_embeddings, expected)
    # Changing a target's actions does not change anything (no label leak).
    actions2 = actions.clone()
    actions2[2] = 0
    out2 = pre(x, offsets, 3, num_targets=torch.tensor([1, 2]), seq_actions=actions2)
    torch.testing.assert_close(out2.seq_embeddings, out.seq_embeddings)


def test_preprocessor_errors():
    pre = ContextualPreprocessor(3, 4, 5, contextual_feature_dim=2, max_contextual_seq_len=1)
    with pytest.raises(ValueError, match=r"seq_embeddings must be \[L, 3\]"):
        pre(torch.randn(2, 4), torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match=r"contextual_embeddings must be \[B, C, contextual_feature_dim\]=\[1, 1, 2\]"):
        pre(torch.randn(2, 3), torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="max_contextual_seq_len must be >= 0"):
        ContextualPreprocessor(3, 4, 5, max_contextual_seq_len=2)
    action_pre = ContextualPreprocessor(3, 4, 5, action_embedding_dim=2, action_weights=[1])
    with pytest.raises(ValueError, match=r"seq_actions must be \[L\]=\[2\]"):
        action_pre(torch.randn(2, 3), torch.tensor([0, 2]), 2)


def test_l2_norm():
    post = L2NormPostprocessor()
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-8, 0.0]])
    out = post(x)
    assert out[0].tolist() == pytest.approx([0.6, 0.8])
    assert out[1].tolist() == [0.0, 0.0]  # eps clamp, no NaN
    assert out[2].tolist() == pytest.approx([1e-2, 0.0])  # 1e-8 / max(1e-8, 1e-6)


def test_layer_norm_keeps_input_dtype():
    post = LayerNormPostprocessor(4)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    out = post(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.layer_norm(x.float(), (4,), eps=1e-5).bfloat16())


def test_timestamp_layer_norm():
    torch.manual_seed(0)
    post = TimestampLayerNormPostprocessor(3, [3600, 86400], [24, 7])
    x = torch.randn(2, 3)
    ts = torch.tensor([0, 86400 * 3 + 3600 * 5 + 10])
    feats = []
    for t in ts.tolist():
        row = []
        for unit, per in ((3600, 24), (86400, 7)):
            phase = ((t // unit) % per) / per * 2 * 3.14
            row += [math.cos(phase), math.sin(phase)]  # interleaved per feature
        feats.append(row)
    combined = torch.cat([x, torch.tensor(feats)], dim=1)
    expected = post.norm(combined @ post.linear.weight.T + post.linear.bias)
    torch.testing.assert_close(post(x, ts), expected)
    with pytest.raises(ValueError, match="needs seq_timestamps"):
        post(x)
    with pytest.raises(ValueError, match="same length"):
        TimestampLayerNormPostprocessor(3, [3600], [24, 7])


def test_preprocessor_runs_in_float64():
    # A float64 model (gradcheck, oracles) must not hit a float32 norm inside the content MLP.
    pre = ContextualPreprocessor(8, 16, 32).double()
    out = pre(torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 2, 5]), max_seq_len=3)
    assert out.seq_embeddings.dtype == torch.float64
