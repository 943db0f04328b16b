"""hstu_mha / hstu_attention (PYTORCH kernel) against an independent dense oracle.

The oracle below loops over sequences; each mask comes from the plain-Python rules in
``tests/strategies.py`` (written from the notes: generative-recommenders id remapping, tzrec
SLA intervals). It shares no code with ``torchrec_hstu.ops.masks`` or the grouped reference.
"""

import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchrec_hstu.ops.pytorch.hstu_attention as pt_attention
from torchrec_hstu.ops import AttentionOptions, HSTUKernel, hstu_attention, hstu_mha
from tests.strategies import JaggedBatch, gr_mask_rule, jagged_batches, oracle_attention, sla_mask_rule


TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-3, rtol=2e-2),
    torch.float16: dict(atol=5e-4, rtol=5e-3),
}


def random_qkv(total: int, heads: int, dqk: int, dv: int, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.empty(total, heads, dqk).uniform_(-1, 1, generator=gen)
    k = torch.empty(total, heads, dqk).uniform_(-1, 1, generator=gen)
    v = torch.empty(total, heads, dv).uniform_(-1, 1, generator=gen)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


@st.composite
def attention_cases(draw, with_contextual=None, sla=None):
    batch: JaggedBatch = draw(jagged_batches(with_contextual=with_contextual))
    use_sla = draw(st.booleans()) if sla is None else sla
    causal = True if use_sla else draw(st.booleans())
    window = 0 if use_sla else draw(st.sampled_from([0, 0, 1, 2, 5]))
    min_full = draw(st.sampled_from([0, 1, 3])) if window > 0 else 0
    return dict(
        batch=batch,
        causal=causal,
        max_attn_len=window,
        min_full_attn_seq_len=min_full,
        sla_k1=draw(st.integers(0, 4)) if use_sla else 0,
        sla_k2=draw(st.integers(0, 4)) if use_sla else 0,
        heads=draw(st.integers(1, 3)),
        dqk=draw(st.sampled_from([1, 4, 8])),
        dv=draw(st.sampled_from([1, 3, 8])),
        extra_len=draw(st.integers(0, 3)),
        scaling_seqlen=draw(st.sampled_from([-1, 7, 50])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
    )


def run_case(case, device="cpu", check_grad=False):
    batch: JaggedBatch = case["batch"]
    sla = case["sla_k1"] > 0 or case["sla_k2"] > 0
    dtype = case["dtype"]
    max_seq_len = batch.max_seq_len + case["extra_len"]
    alpha = 1.0 / math.sqrt(case["dqk"])
    q, k, v = random_qkv(batch.total_len, case["heads"], case["dqk"], case["dv"], dtype, device)
    num_targets = batch.num_targets_tensor()
    out = hstu_mha(
        max_seq_len,
        alpha,
        q,
        k,
        v,
        batch.seq_offsets.to(device),
        causal=case["causal"],
        num_targets=None if num_targets is None else num_targets.to(device),
        max_attn_len=case["max_attn_len"],
        contextual_seq_len=batch.contextual_seq_len,
        min_full_attn_seq_len=case["min_full_attn_seq_len"],
        scaling_seqlen=case["scaling_seqlen"],
        sla_k1=case["sla_k1"],
        sla_k2=case["sla_k2"],
    )
    assert out.dtype == dtype and out.shape == (batch.total_len, case["heads"], case["dv"])
    c = batch.contextual_seq_len
    targets = batch.num_targets

    def mask_fn(b, n):
        t = None if targets is None else targets[b]
        if sla:
            return sla_mask_rule(n, t, c, case["sla_k1"], case["sla_k2"])
        return gr_mask_rule(n, t, c, case["max_attn_len"], case["min_full_attn_seq_len"], case["causal"])

    divisor = max_seq_len if case["scaling_seqlen"] == -1 else case["scaling_seqlen"]
    expected = oracle_attention(q.cpu(), k.cpu(), v.cpu(), batch.lengths, alpha, divisor, mask_fn)
    torch.testing.assert_close(out.cpu().double(), expected, **TOLERANCES[dtype])


@given(case=attention_cases())
def test_hstu_mha_matches_dense_oracle(case):
    run_case(case)


@pytest.mark.parametrize(
    "lengths,targets,c",
    [
        ([0], None, 0),  # one empty sequence
        ([1], [1], 0),  # B=1, length 1, all target
        ([0, 0, 0], [0, 0, 0], 0),  # all empty
        ([5, 5, 5], None, 0),  # all full
        ([2, 0, 1, 7], [1, 0, 1, 3], 2),  # contextual + targets + empty (c=2: len >= 2 except empty)
        ([], None, 0),  # B=0
    ],
)
def test_hstu_mha_edge_batches(lengths, targets, c):
    if c > 0:
        lengths = [n if n == 0 else max(n, c) for n in lengths]
        targets = [0 if n == 0 else t for n, t in zip(lengths, targets)]
    batch = JaggedBatch(lengths=lengths, num_targets=targets, contextual_seq_len=c)
    case = dict(
        batch=batch, causal=True, max_attn_len=0, min_full_attn_seq_len=0, sla_k1=0, sla_k2=0,
        heads=2, dqk=3, dv=2, extra_len=0, scaling_seqlen=-1, dtype=torch.float64,
    )
    run_case(case)


def test_empty_sequence_with_contextual_prefix_is_supported():
    # c > 0 and a sequence with zero tokens (no prefix): nothing to attend, no crash.
    q, k, v = random_qkv(4, 1, 2, 2, torch.float64)
    out = hstu_mha(4, 0.5, q, k, v, torch.tensor([0, 0, 4]), contextual_seq_len=2)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------ grouping / traced paths
def _grouped_vs_single(monkeypatch, ratio, max_elements):
    batch = JaggedBatch(lengths=[9, 1, 0, 4, 7, 2, 9, 3], num_targets=[2, 1, 0, 0, 3, 1, 1, 0], contextual_seq_len=0)
    q, k, v = random_qkv(batch.total_len, 2, 4, 3, torch.float64)
    grad = torch.randn(batch.total_len, 2, 3, dtype=torch.float64)
    options = AttentionOptions(max_attn_len=3, min_full_attn_seq_len=1)

    def run():
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = hstu_attention(qq, kk, vv, batch.seq_offsets, 10, 0.3, options, batch.num_targets_tensor())
        out.backward(grad)
        return [out.detach(), qq.grad, kk.grad, vv.grad]

    single = run()
    monkeypatch.setattr(pt_attention, "GROUP_LENGTH_RATIO", ratio)
    monkeypatch.setattr(pt_attention, "GROUP_MAX_SCORE_ELEMENTS", max_elements)
    groups = pt_attention.group_sequences_by_length(batch.lengths)
    grouped = run()
    for a, b in zip(single, grouped):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    return groups


def test_group_sequences_by_length_partitions_non_empty():
    lengths = [9, 1, 0, 4, 7, 2, 9, 3, 0]
    for ratio, cap in [(0.75, 1 << 24), (1.0, 1 << 24), (0.0, 1 << 24), (0.0, 1)]:
        groups = pt_attention.group_sequences_by_length(lengths, ratio, cap)
        seen = sorted(b for ids, _ in groups for b in ids)
        assert seen == [b for b, n in enumerate(lengths) if n > 0]
        for ids, padded in groups:
            assert padded == max(lengths[b] for b in ids)
            assert all(lengths[b] >= ratio * padded for b in ids)
    assert len(pt_attention.group_sequences_by_length(lengths, 0.0, 1 << 24)) == 1
    assert len(pt_attention.group_sequences_by_length(lengths, 0.0, 1)) == 7


def test_many_groups_equal_single_group(monkeypatch):
    # ratio 0 and a huge cap -> one group (checked), then one group per sequence.
    monkeypatch.setattr(pt_attention, "GROUP_LENGTH_RATIO", 0.0)
    monkeypatch.setattr(pt_attention, "GROUP_MAX_SCORE_ELEMENTS", 1 << 40)
    assert len(pt_attention.group_sequences_by_length([9, 1, 4])) == 1
    groups = _grouped_vs_single(monkeypatch, ratio=1.0, max_elements=1)
    assert len(groups) == 7


def test_traced_path_single_group_padded_to_max_seq_len(monkeypatch):
    batch = JaggedBatch(lengths=[3, 0, 6, 1], num_targets=[1, 0, 2, 0], contextual_seq_len=0)
    q, k, v = random_qkv(batch.total_len, 2, 4, 3, torch.float64)
    options = AttentionOptions(max_attn_len=2)
    eager = hstu_attention(q, k, v, batch.seq_offsets, 9, 0.4, options, batch.num_targets_tensor())
    calls = []
    original = pt_attention.build_mask

    def spy(options_, lengths, padded_len, *args, **kwargs):
        calls.append(padded_len)
        return original(options_, lengths, padded_len, *args, **kwargs)

    monkeypatch.setattr(pt_attention, "is_tracing", lambda: True)
    monkeypatch.setattr(pt_attention, "build_mask", spy)
    traced = hstu_attention(q, k, v, batch.seq_offsets, 9, 0.4, options, batch.num_targets_tensor())
    assert len(calls) == 1 and calls[0] >= 9  # one group, padded to (at least) max_seq_len
    torch.testing.assert_close(traced, eager, atol=1e-12, rtol=1e-12)


def test_export_dynamic_shapes_matches_eager():
    from torch.export import Dim

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, seq_offsets, num_targets):
            return hstu_mha(16, 0.5, q, k, v, seq_offsets, num_targets=num_targets, max_attn_len=3)

    batch = JaggedBatch(lengths=[3, 5, 1], num_targets=[1, 2, 0], contextual_seq_len=0)
    q, k, v = random_qkv(batch.total_len, 2, 4, 4, torch.float32)
    total, nbatch = Dim("total", min=2, max=4096), Dim("batch", min=1, max=512)
    exported = torch.export.export(
        Attention(),
        (q, k, v, batch.seq_offsets, batch.num_targets_tensor()),
        dynamic_shapes=({0: total}, {0: total}, {0: total}, {0: nbatch + 1}, {0: nbatch}),
        strict=False,
    )
    other = JaggedBatch(lengths=[7, 0, 2, 16, 4], num_targets=[2, 0, 1, 1, 4], contextual_seq_len=0)
    q2, k2, v2 = random_qkv(other.total_len, 2, 4, 4, torch.float32, seed=3)
    args = (q2, k2, v2, other.seq_offsets, other.num_targets_tensor())
    torch.testing.assert_close(exported.module()(*args), Attention()(*args), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "options",
    [
        dict(causal=True),
        dict(causal=True, max_attn_len=2, min_full_attn_seq_len=1, contextual_seq_len=1),
        dict(causal=False, max_attn_len=2),
        dict(sla_k1=2, sla_k2=1),
    ],
    ids=["causal", "window+ctx+minfull", "noncausal", "sla"],
)
def test_gradcheck_hstu_mha(options):
    lengths, targets = [4, 0, 1, 3], [1, 0, 0, 2]
    offsets = torch.tensor([0, 4, 4, 5, 8])
    q, k, v = (x.requires_grad_() for x in random_qkv(8, 2, 3, 2, torch.float64))
    num_targets = torch.tensor(targets)

    def fn(q_, k_, v_):
        return hstu_mha(5, 0.7, q_, k_, v_, offsets, num_targets=num_targets, scaling_seqlen=3, **options)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradients_match_autograd_of_oracle():
    batch = JaggedBatch(lengths=[5, 2, 0, 6], num_targets=[2, 1, 0, 1], contextual_seq_len=1)
    q, k, v = (x.requires_grad_() for x in random_qkv(batch.total_len, 2, 3, 4, torch.float64))
    grad = torch.randn(batch.total_len, 2, 4, dtype=torch.float64)
    hstu_mha(8, 0.4, q, k, v, batch.seq_offsets, num_targets=batch.num_targets_tensor(),
             contextual_seq_len=1, max_attn_len=2).backward(grad)
    ours = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None

    def mask_fn(b, n):
        return gr_mask_rule(n, batch.num_targets[b], 1, 2, 0, True)

    oracle_attention(q, k, v, batch.lengths, 0.4, 8, mask_fn).backward(grad)
    for a, b in zip(ours, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_only_needed_input_gradients():
    q, k, v = random_qkv(6, 1, 2, 2, torch.float32)
    v.requires_grad_()
    out = hstu_mha(6, 1.0, q, k, v, torch.tensor([0, 6]))
    (grad_v,) = torch.autograd.grad(out.sum(), [v])
    assert grad_v.shape == v.shape and q.grad is None


# ------------------------------------------------------------------------ dropout
def test_dropout_training_only_and_unbiased():
    torch.manual_seed(0)
    q, k, v = random_qkv(12, 2, 4, 3, torch.float64)
    offsets = torch.tensor([0, 5, 12])
    plain = hstu_mha(7, 0.5, q, k, v, offsets, dropout_pr=0.0)
    eval_mode = hstu_mha(7, 0.5, q, k, v, offsets, dropout_pr=0.5, training=False)
    torch.testing.assert_close(eval_mode, plain)
    samples = torch.stack([hstu_mha(7, 0.5, q, k, v, offsets, dropout_pr=0.5) for _ in range(400)])
    assert not torch.allclose(samples[0], plain)
    # Inverted dropout: the mean over many masks approaches the undropped output.
    assert (samples.mean(0) - plain).abs().max() < 0.1 * plain.abs().max() + 1e-3


def test_dropout_gradient_uses_the_forward_mask():
    q, k, v = (x.requires_grad_() for x in random_qkv(7, 1, 3, 2, torch.float64))
    offsets = torch.tensor([0, 3, 7])
    torch.manual_seed(5)
    out = hstu_mha(4, 0.5, q, k, v, offsets, dropout_pr=0.4)
    out.backward(torch.ones_like(out))
    # Output is linear in v: d(sum out)/dv = column sums of the (dropped) weights, so
    # sum(v * grad_v) must reproduce sum(out) exactly with the same mask.
    torch.testing.assert_close((v * v.grad).sum(), out.sum())


# ------------------------------------------------------------------ mask properties
@given(case=attention_cases(with_contextual=False, sla=False), data=st.data())
@settings(max_examples=15)
def test_causality_later_tokens_never_change_earlier_outputs(case, data):
    batch: JaggedBatch = case["batch"]
    if batch.total_len == 0:
        return
    token = data.draw(st.integers(0, batch.total_len - 1))
    q, k, v = random_qkv(batch.total_len, 2, 3, 2, torch.float64)
    offsets = batch.seq_offsets
    kwargs = dict(num_targets=batch.num_targets_tensor(), max_attn_len=case["max_attn_len"],
                  min_full_attn_seq_len=case["min_full_attn_seq_len"])
    before = hstu_mha(batch.max_seq_len, 0.5, q, k, v, offsets, **kwargs)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[token] += 3.0
    after = hstu_mha(batch.max_seq_len, 0.5, q2, k2, v2, offsets, **kwargs)
    b = int(torch.searchsorted(offsets[1:], torch.tensor(token), right=True))
    start, end = int(offsets[b]), int(offsets[b + 1])
    unaffected = torch.ones(batch.total_len, dtype=torch.bool)
    unaffected[token:end] = False  # same sequence, at or after the token
    torch.testing.assert_close(after[unaffected], before[unaffected], atol=0, rtol=0)
    assert start <= token < end


def test_fixed_scaling_seqlen_is_independent_of_batch_padding():
    q, k, v = random_qkv(9, 2, 4, 3, torch.float64)
    offsets = torch.tensor([0, 4, 9])
    extra_q, extra_k, extra_v = random_qkv(20, 2, 4, 3, torch.float64, seed=7)
    offsets_more = torch.tensor([0, 4, 9, 29])

    def both(scaling):
        small = hstu_mha(5, 0.5, q, k, v, offsets, scaling_seqlen=scaling, num_targets=torch.tensor([1, 2]))
        big = hstu_mha(
            20, 0.5, torch.cat([q, extra_q]), torch.cat([k, extra_k]), torch.cat([v, extra_v]),
            offsets_more, scaling_seqlen=scaling, num_targets=torch.tensor([1, 2, 3]),
        )[:9]
        return small, big

    small, big = both(64)
    torch.testing.assert_close(small, big, atol=1e-14, rtol=1e-12)
    small, big = both(-1)  # the default divides by the batch max: the longer neighbour matters
    assert not torch.allclose(small, big)
    torch.testing.assert_close(small * 5, big * 20, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------ bad inputs
def _good():
    q, k, v = random_qkv(5, 2, 4, 3, torch.float32)
    return dict(max_seq_len=4, alpha=0.5, q=q, k=k, v=v, seq_offsets=torch.tensor([0, 2, 5]))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(q=a["q"][:, :, :, None]), r"q must be 3-D"),
        (lambda a: a.update(k=a["k"][:, :1]), r"k must have q's shape"),
        (lambda a: a.update(v=a["v"][:, :1]), r"v must be 3-D \[L, H, Dv\]"),
        (lambda a: a.update(v=a["v"][:4]), r"v must be 3-D \[L, H, Dv\]"),
        (lambda a: a.update(q=a["q"].double(), k=a["k"].double()), r"q, k, v must share a dtype"),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), r"q must be float16/bfloat16/float32/float64"),
        (lambda a: a.update(seq_offsets=torch.tensor([[0, 2, 5]])), r"seq_offsets must be a 1-D"),
        (lambda a: a.update(seq_offsets=torch.tensor([0.0, 2.0, 5.0])), r"seq_offsets must be int32 or int64"),
        (lambda a: a.update(seq_offsets=torch.tensor([1, 2, 5])), r"seq_offsets must be non-decreasing, start at 0"),
        (lambda a: a.update(seq_offsets=torch.tensor([0, 3, 2, 5])), r"seq_offsets must be non-decreasing"),
        (lambda a: a.update(seq_offsets=torch.tensor([0, 2, 4])), r"seq_offsets .*end at the number of tokens L=5"),
        (lambda a: a.update(num_targets=torch.tensor([1, 1, 1])), r"num_targets must be 1-D of shape \[B\]=\[2\]"),
        (lambda a: a.update(num_targets=torch.tensor([[1, 1]])), r"num_targets must be 1-D"),
        (lambda a: a.update(num_targets=torch.tensor([1.0, 1.0])), r"num_targets must be int32 or int64"),
        (lambda a: a.update(num_targets=torch.tensor([3, 1])), r"num_targets must be in \[0, sequence length\]"),
        (lambda a: a.update(num_targets=torch.tensor([-1, 1])), r"num_targets must be in \[0, sequence length\]"),
        (lambda a: a.update(max_attn_len=-1), r"max_attn_len must be a non-negative int"),
        (lambda a: a.update(contextual_seq_len=-2), r"contextual_seq_len must be a non-negative int"),
        (lambda a: a.update(min_full_attn_seq_len=-1), r"min_full_attn_seq_len must be a non-negative int"),
        (lambda a: a.update(sla_k1=-1), r"sla_k1 must be a non-negative int"),
        (lambda a: a.update(max_seq_len=2), r"max_seq_len=2 is smaller than the longest sequence \(3 tokens\)"),
        (lambda a: a.update(max_seq_len=0), r"max_seq_len must be a positive int"),
        (lambda a: a.update(scaling_seqlen=0), r"scaling_seqlen must be -1"),
        (lambda a: a.update(fp8_quant_mode=6), r"fp8_quant_mode must be an int in \[-1, 5\]"),
        (lambda a: a.update(fp8_quant_mode=-2), r"fp8_quant_mode must be an int in \[-1, 5\]"),
        (lambda a: a.update(kernel="FLASH"), r"kernel must be one of"),
        (lambda a: a.update(dropout_pr=1.0), r"dropout_pr must be in \[0, 1\)"),
        (lambda a: a.update(sla_k1=2, max_attn_len=2), r"max_attn_len and min_full_attn_seq_len must be 0 when SLA is on"),
        (lambda a: a.update(sla_k1=2, causal=False), r"Semi-Local Attention .* requires causal=True"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(change, match):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=match):
        hstu_mha(**args)


def _count_tolist(monkeypatch):
    """Value reads of the input check (the PYTORCH kernel's own length grouping is not counted)."""
    calls = []
    original = torch.Tensor.tolist

    def tolist(self):
        if sys._getframe(1).f_code.co_filename.endswith("torchrec_hstu/ops/common.py"):
            calls.append(self.numel())
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return calls


def test_values_are_read_once_per_batch_across_layer_calls(monkeypatch):
    """GR's models call hstu_mha per layer with one batch's tensors: one value read in all."""
    args = _good()
    targets = torch.tensor([1, 2])
    reads = _count_tolist(monkeypatch)
    for _ in range(3):
        hstu_mha(**args, num_targets=targets)
    assert len(reads) == 1
    hstu_mha(**args, num_targets=targets.clone())  # another tensor: checked again
    hstu_mha(**{**args, "max_seq_len": 5}, num_targets=targets)  # another bound: checked again
    assert len(reads) == 3


@pytest.mark.parametrize("which", ["seq_offsets", "num_targets"])
def test_a_checked_batch_changed_in_place_is_checked_again(which):
    args = _good()
    targets = torch.tensor([1, 2])
    hstu_mha(**args, num_targets=targets)
    if which == "seq_offsets":
        args["seq_offsets"][1:2].fill_(7)  # through a view: the version counter is shared
        match = "seq_offsets must be non-decreasing"
    else:
        targets[0] = 3
        match = r"num_targets must be in \[0, sequence length\]"
    with pytest.raises(ValueError, match=match):
        hstu_mha(**args, num_targets=targets)


def test_inference_tensors_are_checked_every_call(monkeypatch):
    with torch.inference_mode():
        args = _good()
        reads = _count_tolist(monkeypatch)
        hstu_mha(**args)
        hstu_mha(**args)
    assert len(reads) == 2


def test_explicit_kernel_is_refused_not_swapped():
    args = _good()
    with pytest.raises(ValueError, match="kernel=TRITON .*cannot run tensors on cpu"):
        hstu_mha(**args, kernel=HSTUKernel.TRITON)


def test_num_targets_on_another_device_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to put num_targets elsewhere")
    args = _good()
    with pytest.raises(ValueError, match="num_targets"):
        hstu_mha(**args, num_targets=torch.tensor([1, 1], device="cuda"))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@given(case=attention_cases())
def test_gpu_hstu_mha_matches_dense_oracle(case):
    run_case(case, device="cuda")


@pytest.mark.gpu
def test_gpu_gradients_match_cpu():
    batch = JaggedBatch(lengths=[40, 3, 0, 17, 64], num_targets=[5, 1, 0, 2, 8], contextual_seq_len=2)
    q, k, v = random_qkv(batch.total_len, 2, 16, 8, torch.float64)
    grad = torch.randn(batch.total_len, 2, 8, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        qq, kk, vv = (x.detach().clone().to(device).requires_grad_() for x in (q, k, v))
        out = hstu_mha(70, 0.25, qq, kk, vv, batch.seq_offsets.to(device),
                       num_targets=batch.num_targets_tensor().to(device), contextual_seq_len=2, max_attn_len=9)
        out.backward(grad.to(device))
        results.append([t.detach().cpu() for t in (out, qq.grad, kk.grad, vv.grad)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_long_sequences_forward_backward(dtype):
    # Backward must run (the public Triton reference crashed here); large and small shapes.
    lengths = [2048, 1, 0, 700, 1500]
    offsets = torch.tensor([0] + lengths).cumsum(0).cuda()
    q, k, v = (x.requires_grad_() for x in random_qkv(sum(lengths), 4, 64, 64, dtype, "cuda"))
    out = hstu_mha(2048, 0.125, q, k, v, offsets, num_targets=torch.tensor([16, 1, 0, 4, 8]).cuda())
    out.float().square().sum().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t.float()).all()
