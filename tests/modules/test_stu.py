"""STULayer / STUStack against the layer formula written out in the test."""

import copy
import math
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_hstu.modules import STULayer, STULayerConfig, STUStack
from torchrec_hstu.ops.hstu_compute import hstu_compute_uqvk
from tests.strategies import JaggedBatch, gr_mask_rule, jagged_batches, oracle_attention


def oracle_layer(
    layer: STULayer, x: torch.Tensor, batch: JaggedBatch, max_seq_len: int, targets: Optional[List[int]]
) -> torch.Tensor:
    """One STU layer by its definition (notes section 3), eval mode, float64."""
    cfg = layer.config
    h, a, heads = cfg.hidden_dim, cfg.attention_dim, cfg.num_heads
    x = x.double()
    normed = F.layer_norm(x, (x.shape[1],), layer.input_norm_weight.double(), layer.input_norm_bias.double(), 1e-6)
    uvqk = normed @ layer.uvqk_weight.double() + layer.uvqk_beta.double()
    if cfg.uvqk_activation == "all":  # GR's research HSTU: silu on u, v, q and k
        uvqk = F.silu(uvqk)
        u = uvqk[:, : h * heads]
    else:  # GR's production STU: silu on u only
        u = F.silu(uvqk[:, : h * heads])
    v = uvqk[:, h * heads : 2 * h * heads].reshape(-1, heads, h)
    q = uvqk[:, 2 * h * heads : 2 * h * heads + a * heads].reshape(-1, heads, a)
    k = uvqk[:, 2 * h * heads + a * heads :].reshape(-1, heads, a)
    c = batch.contextual_seq_len
    window = cfg.max_attn_len or 0

    def mask_fn(b, n):
        return gr_mask_rule(n, None if targets is None else targets[b], c, window, 0, cfg.causal)

    divisor = max_seq_len if cfg.scaling_seqlen == -1 else cfg.scaling_seqlen
    alpha = cfg.attn_alpha or 1.0 / math.sqrt(a)
    attn = oracle_attention(q, k, v, batch.lengths, alpha, divisor, mask_fn).reshape(-1, heads * h)
    if cfg.use_group_norm:
        per_head = attn.reshape(-1, heads, h)
        mean = per_head.mean(-1, keepdim=True)
        var = per_head.var(-1, unbiased=False, keepdim=True)
        normed_attn = ((per_head - mean) / torch.sqrt(var + 1e-6)) * layer.output_norm_weight.double().view(1, heads, 1)
        normed_attn = (normed_attn + layer.output_norm_bias.double().view(1, heads, 1)).reshape(-1, heads * h)
    else:
        normed_attn = F.layer_norm(
            attn, (heads * h,), layer.output_norm_weight.double(), layer.output_norm_bias.double(), 1e-6
        )
    y = torch.cat([u, attn, u * normed_attn], dim=1)
    return x + y @ layer.output_weight.double()


def make_layer(seed=0, **kwargs) -> STULayer:
    torch.manual_seed(seed)
    layer = STULayer(**{**dict(embedding_dim=8, num_heads=2, hidden_dim=3, attention_dim=4, output_dropout_ratio=0.0), **kwargs})
    with torch.no_grad():  # non-trivial norm parameters
        for p in (layer.uvqk_beta, layer.input_norm_bias, layer.output_norm_bias):
            p.uniform_(-0.3, 0.3)
        for p in (layer.input_norm_weight, layer.output_norm_weight):
            p.uniform_(0.5, 1.5)
    return layer


@given(
    batch=jagged_batches(max_len=10),
    use_group_norm=st.booleans(),
    window=st.sampled_from([None, 2]),
    target_aware=st.booleans(),
    scaling_seqlen=st.sampled_from([-1, 16]),
)
@settings(max_examples=12)
def test_layer_matches_formula(batch, use_group_norm, window, target_aware, scaling_seqlen):
    layer = make_layer(
        use_group_norm=use_group_norm, max_attn_len=window, target_aware=target_aware,
        contextual_seq_len=batch.contextual_seq_len, scaling_seqlen=scaling_seqlen,
    ).double().eval()
    x = torch.randn(batch.total_len, 8, dtype=torch.float64)
    max_seq_len = batch.max_seq_len + 1
    out = layer(x, batch.seq_offsets, max_seq_len, batch.num_targets_tensor())
    targets = batch.num_targets if target_aware else None
    torch.testing.assert_close(out, oracle_layer(layer, x, batch, max_seq_len, targets), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("target_aware", [False, True])
def test_uvqk_activation_all_matches_formula_and_changes_outputs(target_aware):
    """``uvqk_activation="all"`` (GR's research HSTU) = the formula with silu on u, v, q and k;
    the same weights with the default (silu on u only) give different outputs."""
    batch = JaggedBatch(lengths=[4, 1, 6], num_targets=[1, 0, 2], contextual_seq_len=0)
    layer = make_layer(uvqk_activation="all", target_aware=target_aware).double().eval()
    x = torch.randn(batch.total_len, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = layer(x, batch.seq_offsets, 7, batch.num_targets_tensor())
    targets = batch.num_targets if target_aware else None
    torch.testing.assert_close(out, oracle_layer(layer, x, batch, 7, targets), atol=1e-10, rtol=1e-8)
    default = make_layer(target_aware=target_aware).double().eval()
    default.load_state_dict(layer.state_dict())
    assert (out - default(x, batch.seq_offsets, 7, batch.num_targets_tensor())).abs().max() > 1e-3


def test_uvqk_activation_default_is_the_previous_computation_bit_for_bit():
    """The default (and ``"u"``) is the computation before the option existed, to the bit:
    ``addmm`` of the normed input, split, silu on u only."""
    layer = make_layer()
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(4))
    normed = F.layer_norm(x, (8,), layer.input_norm_weight, layer.input_norm_bias, 1e-6)
    uvqk = torch.addmm(layer.uvqk_beta, normed, layer.uvqk_weight)
    u, v, q, k = torch.split(uvqk, [6, 6, 8, 8], dim=1)
    want = (F.silu(u), q.reshape(-1, 2, 4), k.reshape(-1, 2, 4), v.reshape(-1, 2, 3))
    for recompute in (False, True):
        for extra in ({}, {"uvqk_activation": "u"}):
            got = hstu_compute_uqvk(x, *layer._projection(), recompute_normed_x=recompute,
                                    recompute_uvqk=recompute, **extra)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    offsets = torch.tensor([0, 3, 7])
    explicit = make_layer(uvqk_activation="u")
    assert torch.equal(layer(x, offsets, 4), explicit(x, offsets, 4))
    with pytest.raises(ValueError, match="uvqk_activation must be 'u'"):
        hstu_compute_uqvk(x, *layer._projection(), uvqk_activation="ALL")


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("use_group_norm", [False, True])
def test_gradcheck_layer(recompute, use_group_norm):
    layer = make_layer(
        use_group_norm=use_group_norm, recompute_normed_x=recompute, recompute_uvqk=recompute,
        recompute_y=recompute, max_attn_len=2, contextual_seq_len=1,
    ).double()
    offsets = torch.tensor([0, 4, 5, 5, 8])
    num_targets = torch.tensor([1, 0, 0, 1])
    x = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    params = dict(layer.named_parameters())
    names = ["uvqk_weight", "output_weight", "output_norm_weight"]

    def fn(x_, *tensors):
        overrides = {**params, **dict(zip(names, tensors))}
        return torch.func.functional_call(layer, overrides, (x_, offsets, 4, num_targets))

    inputs = (x,) + tuple(params[n].detach().clone().requires_grad_() for n in names)
    # fast_mode checks random projections of the Jacobian (full mode: ~20 s per case on 2 cores).
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("uvqk_activation", ["u", "all"])
def test_recompute_flags_do_not_change_results(uvqk_activation):
    results = []
    for recompute in (False, True):
        layer = make_layer(recompute_normed_x=recompute, recompute_uvqk=recompute, recompute_y=recompute,
                           output_dropout_ratio=0.3, uvqk_activation=uvqk_activation).train()
        x = torch.randn(9, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(3)  # same dropout mask in both runs
        out = layer(x, torch.tensor([0, 4, 9]), 5, torch.tensor([1, 2]))
        out.square().sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    layer = make_layer(output_dropout_ratio=0.5)
    x = torch.randn(6, 8)
    offsets = torch.tensor([0, 6])
    layer.eval()
    torch.testing.assert_close(layer(x, offsets, 6), layer(x, offsets, 6))
    layer.train()
    assert not torch.allclose(layer(x, offsets, 6), layer(x, offsets, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_permutation_equivariance(dtype):
    torch.manual_seed(0)
    stack = STUStack([make_layer(seed=s, target_aware=True) for s in range(2)]).to(dtype)
    offsets = torch.tensor([0, 7, 12])
    num_targets = torch.tensor([3, 2])
    x = torch.randn(12, 8, dtype=dtype)
    weights = torch.randn(12, 8, dtype=dtype)
    perm = torch.arange(12)
    perm[[4, 6]] = perm[[6, 4]]  # swap two targets of sequence 0
    perm[[10, 11]] = perm[[11, 10]]  # and of sequence 1

    def run(inputs, w):
        inputs = inputs.clone().requires_grad_()
        out = stack(inputs, offsets, 7, num_targets).x
        (out.float() * w.float()).sum().backward()
        grads = [p.grad.clone() for p in stack.parameters()]
        stack.zero_grad()
        return out.detach(), inputs.grad, grads

    out, grad_x, grads = run(x, weights)
    out_p, grad_x_p, grads_p = run(x[perm], weights[perm])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out_p, out[perm], **tol)
    torch.testing.assert_close(grad_x_p, grad_x[perm], **tol)
    for a, b in zip(grads_p, grads):
        torch.testing.assert_close(a, b, **tol)
    # Swapping a history token with a target is not a symmetry (the test can fail).
    perm_bad = torch.arange(12)
    perm_bad[[1, 5]] = perm_bad[[5, 1]]
    assert not torch.allclose(run(x[perm_bad], weights)[0].float(), out[perm_bad].float(), atol=1e-3)


def test_stack_with_truncation_equals_layers_by_hand():
    layers = [make_layer(seed=s, contextual_seq_len=1) for s in range(3)]
    stack = STUStack(copy.deepcopy(layers), attn_truncation_split_layer=2, attn_truncation_tail_len=2).eval()
    lengths, targets = [6, 1, 4, 8], [1, 0, 2, 3]  # each length includes the 1-token prefix
    offsets = torch.tensor([0, 6, 7, 11, 19])
    x = torch.randn(19, 8)
    out = stack(x, offsets, 8, torch.tensor(targets))
    # By hand: layers 0 and 1 on full sequences, then keep [prefix | last 2 history | targets].
    h = x
    for layer in layers[:2]:
        h = layer.eval()(h, offsets, 8, torch.tensor(targets))
    keep, new_lengths, start = [], [], 0
    for n, t in zip(lengths, targets):
        history = list(range(start + 1, start + n - t))
        rows = [start] + history[-2:] + list(range(start + n - t, start + n))
        keep += rows
        new_lengths.append(len(rows))
        start += n
    new_offsets = torch.tensor([0] + new_lengths).cumsum(0)
    h = layers[2].eval()(h[keep], new_offsets, max(new_lengths), torch.tensor(targets))
    torch.testing.assert_close(out.x, h)
    assert out.x_offsets.tolist() == new_offsets.tolist()
    assert out.max_seq_len == max(new_lengths) == 6
    assert out.truncation_plan.keep_index.tolist() == keep


def test_truncation_keeps_targets_even_when_not_target_aware():
    layers = [make_layer(seed=s, target_aware=False) for s in range(2)]
    stack = STUStack(layers, attn_truncation_split_layer=1, attn_truncation_tail_len=1)
    out = stack(torch.randn(9, 8), torch.tensor([0, 5, 9]), 5, torch.tensor([3, 2]))
    assert out.x_offsets.tolist() == [0, 4, 7]  # 1 history + 3 targets, 1 history + 2 targets


def test_stack_shares_masks_across_layers():
    stack = STUStack([make_layer(seed=s) for s in range(3)])
    calls = []
    import torchrec_hstu.ops.pytorch.hstu_attention as pt

    original = pt.build_mask

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    pt.build_mask = spy
    try:
        stack(torch.randn(9, 8), torch.tensor([0, 5, 9]), 5, torch.tensor([1, 2]))
    finally:
        pt.build_mask = original
    assert len(calls) == 1  # one length group, built once, reused by three layers


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_heads=0), ValueError, "num_heads must be a positive int"),
        (dict(output_dropout_ratio=1.0), ValueError, r"output_dropout_ratio must be in \[0, 1\)"),
        (dict(contextual_seq_len=-2), ValueError, "contextual_seq_len must be >= 0 or -1"),
        (dict(fp8_quant_mode=7), ValueError, r"fp8_quant_mode must be an int in \[-1, 5\]"),
        (dict(max_attn_len=-1), ValueError, "max_attn_len must be a non-negative int"),
        (dict(kernel="NOPE"), ValueError, "kernel must be one of"),
        (dict(uvqk_activation="qk"), ValueError, r"uvqk_activation must be 'u' .* or 'all' .*; got 'qk'"),
        (dict(bogus=1), TypeError, "unknown arguments"),
    ],
)
def test_layer_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        STULayer(**{**dict(embedding_dim=8, num_heads=2, hidden_dim=3, attention_dim=4), **kwargs})


def test_layer_defaults_follow_the_anchors():
    cfg = STULayerConfig(embedding_dim=8, num_heads=2, hidden_dim=3, attention_dim=16)
    assert cfg.output_dropout_ratio == 0.3 and cfg.causal and cfg.target_aware
    assert cfg.alpha == 0.25 and cfg.scaling_seqlen == -1 and cfg.fp8_quant_mode == -1
    assert not cfg.use_group_norm and cfg.attention_options().max_attn_len == 0
    assert cfg.uvqk_activation == "u"  # GR's production STU: silu on u only


@pytest.mark.parametrize(
    "split,tail,match",
    [(1, 0, "must be set together"), (0, 3, "must be set together"), (2, 3, r"must be in \(0, 2\)"), (-1, 0, ">= 0")],
)
def test_stack_truncation_arguments(split, tail, match):
    with pytest.raises(ValueError, match=match):
        STUStack([make_layer(), make_layer()], split, tail)


def test_layer_input_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"x must be \[L, d\] with d=8"):
        layer(torch.randn(5, 7), torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match="seq_offsets"):
        layer(torch.randn(5, 8), torch.tensor([0, 4]), 5)


@pytest.mark.gpu
def test_gpu_layer_matches_cpu():
    layer = make_layer(max_attn_len=3, contextual_seq_len=1).double()
    batch = JaggedBatch(lengths=[5, 1, 9, 30], num_targets=[1, 0, 2, 4], contextual_seq_len=1)
    x = torch.randn(batch.total_len, 8, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        layer_d = copy.deepcopy(layer).to(device)
        xd = x.detach().clone().to(device).requires_grad_()
        out = layer_d(xd, batch.seq_offsets.to(device), 30, batch.num_targets_tensor().to(device))
        out.square().sum().backward()
        results.append([out.detach().cpu(), xd.grad.cpu()] + [p.grad.cpu() for p in layer_d.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_min_full_attn_seq_len_reaches_attention():
    torch.manual_seed(0)
    kwargs = dict(embedding_dim=8, num_heads=1, hidden_dim=4, attention_dim=4, output_dropout_ratio=0.0, max_attn_len=1)
    windowed = STULayer(**kwargs)
    tail_full = STULayer(**kwargs, min_full_attn_seq_len=2)
    tail_full.load_state_dict(windowed.state_dict())
    assert tail_full.attention_options.min_full_attn_seq_len == 2
    x, offsets = torch.randn(6, 8), torch.tensor([0, 6])
    a, b = windowed(x, offsets, 6), tail_full(x, offsets, 6)
    # Rows before the tail see only the window either way; the last two rows see everything.
    torch.testing.assert_close(a[:4], b[:4])
    assert not torch.allclose(a[4:], b[4:])
