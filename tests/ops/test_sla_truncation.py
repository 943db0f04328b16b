"""SLA + mid-stack truncation at module level vs an independent per-sequence dense oracle.

The oracle below re-derives one STU layer from its definition, one sequence at a time, in
float64 with Python loops for the masks (no library helper): the SLA rule of the notes, the
truncation rule ``[contextual C | last tail_len history | all targets]`` and the attention
divisor ``scaling_seqlen`` (-1: the batch's longest sequence at that layer).
"""

from typing import List, Optional

import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies import jagged_batches
from torchrec_hstu.config import hstu_pb2, parse_config, build_transducer
from torchrec_hstu.modules import STULayer, STUStack


def oracle_sla_mask(n: int, num_targets: int, k1: int, k2: int, contextual: int) -> torch.Tensor:
    """``[n, n]`` 0/1 float64: row ``p`` may attend column ``j``."""
    history_end = max(n - num_targets, 0)
    prefix = max(k2, contextual)
    rows = []
    for p in range(n):
        row = []
        for j in range(n):
            if p >= history_end:
                ok = j < history_end
            else:
                ok = j <= p and (j < prefix or j >= p - k1 + 1)
            row.append(1.0 if ok else 0.0)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).reshape(n, n)


def oracle_layer(layer: STULayer, x: torch.Tensor, mask: torch.Tensor, divisor: int) -> torch.Tensor:
    """One STU layer on one sequence ``x: [n, d]`` (eval mode, no dropout)."""
    cfg = layer.config
    h, dh, da = cfg.num_heads, cfg.hidden_dim, cfg.attention_dim
    n = x.shape[0]
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 1e-6) * layer.input_norm_weight + layer.input_norm_bias
    proj = normed @ layer.uvqk_weight + layer.uvqk_beta
    u = proj[:, : h * dh]
    v = proj[:, h * dh : 2 * h * dh].reshape(n, h, dh)
    q = proj[:, 2 * h * dh : 2 * h * dh + h * da].reshape(n, h, da)
    k = proj[:, 2 * h * dh + h * da :].reshape(n, h, da)
    u = u * torch.sigmoid(u)
    heads = []
    for head in range(h):
        s = cfg.alpha * q[:, head] @ k[:, head].T
        w = s * torch.sigmoid(s) / divisor * mask
        heads.append(w @ v[:, head])
    a = torch.stack(heads, dim=1)  # [n, h, dh]
    if cfg.use_group_norm:
        m = a.mean(-1, keepdim=True)
        s2 = ((a - m) ** 2).mean(-1, keepdim=True)
        na = (a - m) / torch.sqrt(s2 + 1e-6)
        na = na * layer.output_norm_weight.view(1, h, 1) + layer.output_norm_bias.view(1, h, 1)
        na = na.reshape(n, h * dh)
        a = a.reshape(n, h * dh)
    else:
        a = a.reshape(n, h * dh)
        m = a.mean(-1, keepdim=True)
        s2 = ((a - m) ** 2).mean(-1, keepdim=True)
        na = (a - m) / torch.sqrt(s2 + 1e-6) * layer.output_norm_weight + layer.output_norm_bias
    y = torch.cat([u, a, u * na], dim=-1)
    return x + y @ layer.output_weight


def oracle_stack(
    layers: List[STULayer],
    seqs: List[torch.Tensor],
    targets: List[int],
    contextual: int,
    k1: int,
    k2: int,
    split: int,
    tail: int,
    scaling_seqlen: int,
) -> List[torch.Tensor]:
    seqs = list(seqs)
    for index, layer in enumerate(layers):
        if split > 0 and index == split:
            kept = []
            for x, t in zip(seqs, targets):
                n = x.shape[0]
                history = x[contextual : n - t]
                keep_history = history[max(history.shape[0] - tail, 0) :]
                kept.append(torch.cat([x[:contextual], keep_history, x[n - t :]]))
            seqs = kept
        divisor = scaling_seqlen if scaling_seqlen > 0 else max([1] + [x.shape[0] for x in seqs])
        seqs = [
            oracle_layer(layer, x, oracle_sla_mask(x.shape[0], t, k1, k2, contextual), divisor)
            if x.shape[0] > 0
            else x
            for x, t in zip(seqs, targets)
        ]
    return seqs


def _stack(
    num_layers: int, d: int, heads: int, k1: int, k2: int, contextual: int, split: int, tail: int,
    scaling_seqlen: int, use_group_norm: bool,
) -> STUStack:
    torch.manual_seed(0)
    layers = [
        STULayer(
            embedding_dim=d,
            num_heads=heads,
            hidden_dim=3,
            attention_dim=4,
            output_dropout_ratio=0.0,
            sla_k1=k1,
            sla_k2=k2,
            contextual_seq_len=contextual,
            scaling_seqlen=scaling_seqlen,
            use_group_norm=use_group_norm,
        )
        for _ in range(num_layers)
    ]
    stack = STUStack(layers, attn_truncation_split_layer=split, attn_truncation_tail_len=tail)
    # Non-trivial norm affine parameters so the oracle's use of them is checked too.
    for layer in layers:
        with torch.no_grad():
            layer.output_norm_weight.uniform_(0.5, 1.5)
            layer.output_norm_bias.uniform_(-0.2, 0.2)
            layer.input_norm_bias.uniform_(-0.2, 0.2)
    return stack.double().eval()


def _check(stack: STUStack, lengths: List[int], targets: Optional[List[int]], contextual: int,
           k1: int, k2: int, split: int, tail: int, scaling_seqlen: int) -> None:
    d = stack.layers[0].config.embedding_dim
    total = sum(lengths)
    x = torch.randn(total, d, dtype=torch.float64)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    num_targets = None if targets is None else torch.tensor(targets)
    seqs = [x[offsets[b] : offsets[b + 1]] for b in range(len(lengths))]
    with torch.no_grad():
        out = stack(x, offsets, max_seq_len=max([1] + lengths), num_targets=num_targets)
        expected = oracle_stack(
            list(stack.layers), seqs, targets or [0] * len(lengths), contextual, k1, k2, split, tail, scaling_seqlen
        )
    expected_lengths = [e.shape[0] for e in expected]
    got_lengths = (out.x_offsets[1:] - out.x_offsets[:-1]).tolist()
    assert got_lengths == expected_lengths
    assert out.max_seq_len == max([1] + expected_lengths)
    # hstu_compute_output computes the output norm in float32 even for float64 inputs, hence
    # float32-level tolerances; a wrong mask or truncation shows up as O(0.1) differences.
    torch.testing.assert_close(out.x, torch.cat(expected), rtol=1e-4, atol=1e-5)


def test_ultra_shape_stack_matches_oracle():
    """4 layers, SLA (K1=3, K2=2) everywhere, truncation before layer 2 keeping 4, group norm."""
    stack = _stack(4, 8, 2, k1=3, k2=2, contextual=1, split=2, tail=4, scaling_seqlen=-1, use_group_norm=True)
    _check(stack, lengths=[12, 0, 1, 7, 9], targets=[2, 0, 0, 3, 1], contextual=1, k1=3, k2=2, split=2,
           tail=4, scaling_seqlen=-1)


def test_truncation_changes_outputs_and_scaling_follows_new_max():
    """Truncation is observable: the same stack without it gives different candidate outputs."""
    lengths, targets = [14, 10], [2, 1]
    with_trunc = _stack(3, 8, 2, k1=2, k2=1, contextual=0, split=1, tail=3, scaling_seqlen=-1, use_group_norm=False)
    _check(with_trunc, lengths, targets, 0, 2, 1, 1, 3, -1)
    without = _stack(3, 8, 2, k1=2, k2=1, contextual=0, split=0, tail=0, scaling_seqlen=-1, use_group_norm=False)
    x = torch.randn(sum(lengths), 8, dtype=torch.float64)
    offsets = torch.tensor([0, 14, 24])
    a = with_trunc(x, offsets, 14, torch.tensor(targets))
    b = without(x, offsets, 14, torch.tensor(targets))
    assert a.x.shape[0] == 2 + 3 + 1 + 3  # per sequence: tail 3 history + targets
    assert not torch.allclose(a.x[3:5], b.x[12:14])


@given(
    batch=jagged_batches(max_batch=4, max_len=14),
    k1=st.integers(0, 5),
    k2=st.integers(0, 4),
    layers_and_split=st.sampled_from([(2, 1), (3, 2), (3, 1), (2, 0)]),
    tail=st.integers(1, 6),
    scaling_seqlen=st.sampled_from([-1, 9]),
    use_group_norm=st.booleans(),
)
def test_stack_with_sla_and_truncation_matches_oracle(batch, k1, k2, layers_and_split, tail, scaling_seqlen, use_group_norm):
    if k1 == 0 and k2 == 0:
        k1 = 1  # SLA on
    num_layers, split = layers_and_split
    tail = tail if split > 0 else 0
    stack = _stack(num_layers, 6, 2, k1, k2, batch.contextual_seq_len, split, tail, scaling_seqlen, use_group_norm)
    _check(stack, batch.lengths, batch.num_targets, batch.contextual_seq_len, k1, k2, split, tail, scaling_seqlen)


def test_oracle_mask_is_not_the_library_mask_by_construction():
    """Spot values of the SLA rule, by hand: n=7, 2 targets, K1=2, K2=1, no contextual."""
    m = oracle_sla_mask(7, 2, k1=2, k2=1, contextual=0)
    assert m[4].tolist() == [1, 0, 0, 1, 1, 0, 0]  # global prefix {0} + local {3, 4}
    assert m[5].tolist() == [1, 1, 1, 1, 1, 0, 0]  # target: all history, not itself
    assert m[0].tolist() == [1, 0, 0, 0, 0, 0, 0]


def test_config_built_transducer_stack_matches_oracle():
    """Text config (SLA + truncation) -> transducer -> its STU stack agrees with the oracle."""
    cfg = parse_config(
        """
        stu { embedding_dim: 8 num_heads: 2 hidden_dim: 3 attention_dim: 4 output_dropout_ratio: 0
              use_group_norm: true sla_k1: 3 sla_k2: 2 }
        attn_num_layers: 4 attn_truncation_split_layer: 2 attn_truncation_tail_len: 4
        input_dropout_ratio: 0
        """,
        hstu_pb2.HSTU,
    )
    torch.manual_seed(1)
    transducer = build_transducer(cfg).double().eval()
    stack = transducer.stu_module
    assert stack.attn_truncation_split_layer == 2 and stack.attn_truncation_tail_len == 4
    for layer in stack.layers:
        assert (layer.attention_options.sla_k1, layer.attention_options.sla_k2) == (3, 2)
    _check(stack, [11, 3, 8], [2, 1, 0], 0, 3, 2, 2, 4, -1)
