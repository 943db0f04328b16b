"""The CUTLASS wheel adapter (torchrec_hstu.ops.cutlass) against a stand-in ``hstu`` module.

The real ``fbgemm_gpu_hstu`` wheel cannot be installed here. The stand-in has the wheel's
signatures (legacy hopper and FBGEMM fork) and checks argument types like the wheel does; it
then DECODES the arguments (cu_seqlens -> offsets, num_contexts -> contextual prefix,
num_targets, window_size -> causal / window, func -> interval mask, scaling_seqlen, alpha,
quant_mode) and computes with the reference / our FP8 emulation (or, for func without FP8,
a dense loop written here). Any plumbing mistake changes the result and fails the test.
"""

import dataclasses
import sys
import types
from typing import Dict, List

import pytest
import torch
from hypothesis import given

from strategies import jagged_batches
from torchrec_hstu.ops import backends
from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel
from torchrec_hstu.ops.cutlass import build_sla_func_tensor, cutlass_available, cutlass_hstu_attention
from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated
from torchrec_hstu.ops.hstu_attention import hstu_attention
from torchrec_hstu.ops.masks import sla_attention_mask
from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention


def decode_func_mask(func: torch.Tensor, n: int, start: int) -> torch.Tensor:
    """[H, n, n] bool from the kernel's per-query intervals [0, f0) U [f1, f2)."""
    f = func[:, :, start:start + n].long()  # [H, 3, n]
    cols = torch.arange(n).view(1, 1, n)
    return (cols < f[:, 0, :, None]) | ((cols >= f[:, 1, :, None]) & (cols < f[:, 2, :, None]))


def dense_func_attention(q, k, v, offsets, alpha, scaling, func):
    out = torch.zeros(v.shape, dtype=torch.float32)
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        if e == s:
            continue
        mask = decode_func_mask(func, e - s, s)
        qs, ks, vs = (t[s:e].float().transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        w = torch.nn.functional.silu(alpha * qs @ ks.transpose(1, 2)) / scaling * mask
        out[s:e] = (w @ vs).transpose(0, 1)
    return out.to(q.dtype)


def standin_compute(record: List[Dict], legacy: bool, **kw) -> torch.Tensor:
    record.append(kw)
    q, k, v = kw["q"], kw["k"], kw["v"]
    cu = kw["cu_seqlens_q"]
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert cu.dtype == torch.int32 and kw["cu_seqlens_k"] is cu or torch.equal(kw["cu_seqlens_k"], cu)
    assert kw["max_seqlen_q"] == kw["max_seqlen_k"]
    assert kw["target_group_size"] == 1 and kw["rab"] is None and kw["has_drab"] is False
    batch = cu.numel() - 1
    contexts, targets, window, func = kw["num_contexts"], kw["num_targets"], tuple(kw["window_size"]), kw["func"]
    for t in (contexts, targets):
        assert t is None or (t.dtype == torch.int32 and t.shape == (batch,))
    if contexts is not None or targets is not None:
        assert window == (-1, 0), "num_contexts/num_targets need window (-1, 0)"
    max_seq_len = kw["max_seqlen_q"]
    scaling = kw["scaling_seqlen"]
    if scaling == -1:
        assert legacy, "the fork requires an explicit scaling_seqlen"
        scaling = max_seq_len
    mode = kw["quant_mode"]
    assert -1 <= mode <= 5
    offsets = cu.long()
    contextual = 0
    if contexts is not None:
        assert contexts.unique().numel() == 1
        contextual = int(contexts[0])
    num_targets = None if targets is None else targets.long()
    alpha = kw["alpha"]
    if func is not None:
        assert func.dtype == torch.int32 and func.shape == (q.shape[1], 3, q.shape[0]) and func.is_contiguous()
        if mode < 0:
            return dense_func_attention(q, k, v, offsets, alpha, scaling, func)
        opts = AttentionOptions(scaling_seqlen=scaling, fp8_quant_mode=mode)
        out = fp8_hstu_attention_emulated(q, k, v, offsets, max_seq_len, alpha, opts, None, func=func)
    else:
        left, right = window
        opts = AttentionOptions(
            causal=right == 0,
            max_attn_len=max(left, 0),
            contextual_seq_len=contextual,
            scaling_seqlen=scaling,
            fp8_quant_mode=mode,
        )
        if mode < 0:
            out = pytorch_hstu_attention(q, k, v, offsets, max_seq_len, alpha, opts, num_targets)
        else:
            out = fp8_hstu_attention_emulated(q, k, v, offsets, max_seq_len, alpha, opts, num_targets)
    if legacy and mode >= 0:
        out = out.to(torch.float16)  # the legacy wheel's FP8 output dtype
    return out


_DROPPED = ("record", "seqused_q", "seqused_k", "kv_cache", "page_offsets", "page_ids", "last_page_lens")


def _wheel_args(args: Dict) -> Dict:
    return {name: value for name, value in args.items() if name not in _DROPPED}


def make_module(kind: str, record: List[Dict]) -> types.ModuleType:
    module = types.ModuleType("hstu")
    if kind == "fork":
        def hstu_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
                                  max_seqlen_k, scaling_seqlen, num_contexts, num_targets, target_group_size=1,
                                  window_size=(-1, -1), alpha=1.0, rab=None, has_drab=False, kv_cache=None,
                                  page_offsets=None, page_ids=None, last_page_lens=None, func=None, quant_mode=-1):
            args = dict(locals())
            assert seqused_q is None and seqused_k is None
            assert kv_cache is None and page_offsets is None and page_ids is None and last_page_lens is None
            return standin_compute(record, False, **_wheel_args(args))
    elif kind == "legacy":
        def hstu_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  num_contexts=None, num_targets=None, target_group_size=1, window_size=(-1, -1),
                                  alpha=1.0, rab=None, has_drab=False, func=None, quant_mode=-1, scaling_seqlen=-1):
            return standin_compute(record, True, **_wheel_args(dict(locals())))
    elif kind == "no_fp8":  # an older wheel: no quant_mode, no func, no scaling_seqlen
        def hstu_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  num_contexts=None, num_targets=None, target_group_size=1, window_size=(-1, -1),
                                  alpha=1.0, rab=None, has_drab=False):
            return standin_compute(record, True, func=None, quant_mode=-1, scaling_seqlen=-1, **_wheel_args(dict(locals())))
    else:
        raise ValueError(kind)
    module.hstu_attn_varlen_func = hstu_attn_varlen_func
    return module


@pytest.fixture
def wheel(monkeypatch):
    def install(kind: str) -> List[Dict]:
        record: List[Dict] = []
        monkeypatch.setitem(sys.modules, "hstu", make_module(kind, record))
        return record
    return install


def inputs(lengths, heads=2, dim=16, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    return q, k, v, torch.tensor([0] + lengths).cumsum(0)


LENGTHS = [9, 0, 30, 1, 17]
TARGETS = torch.tensor([2, 0, 4, 1, 3])
MASKS = {
    "causal": (dict(), False),
    "targets": (dict(), True),
    "contextual+targets": (dict(contextual_seq_len=2), True),
    "window": (dict(max_attn_len=5), False),
    "sla+targets": (dict(sla_k1=4, sla_k2=3, contextual_seq_len=1), True),
    "scaling": (dict(scaling_seqlen=64), True),
    "non-causal": (dict(causal=False), False),
}


@pytest.mark.parametrize("kind", ["fork", "legacy"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_bf16_matches_reference(wheel, kind, mask):
    record = wheel(kind)
    kwargs, with_targets = MASKS[mask]
    options = AttentionOptions(**kwargs)
    nt = TARGETS if with_targets else None
    q, k, v, offsets = inputs(LENGTHS)
    out = cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, options, nt)
    ref = pytorch_hstu_attention(q, k, v, offsets, 30, 0.25, options, nt)
    assert out.dtype == torch.bfloat16 and out.shape == v.shape
    if options.use_sla:
        torch.testing.assert_close(out, ref)  # stand-in's own dense loop vs the reference
        assert record[0]["func"] is not None and record[0]["window_size"] == (-1, 0)
    else:
        assert torch.equal(out, ref)
    call = record[0]
    assert ("quant_mode" in call) and call["quant_mode"] == -1
    # gradients flow through the wheel's function
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", range(6))
@pytest.mark.parametrize("mask", ["causal", "contextual+targets", "sla+targets", "scaling", "window"])
def test_fp8_modes_fork_matches_emulation(wheel, mode, mask):
    record = wheel("fork")
    kwargs, with_targets = MASKS[mask]
    options = AttentionOptions(fp8_quant_mode=mode, **kwargs)
    nt = TARGETS if with_targets else None
    q, k, v, offsets = inputs(LENGTHS, seed=mode)
    out = cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, options, nt)
    want = fp8_hstu_attention_emulated(q, k, v, offsets, 30, 0.25, options, nt)
    assert torch.equal(out, want)
    assert record[0]["quant_mode"] == mode


@pytest.mark.parametrize("mode", [0, 1, 2, 5])
def test_fp8_legacy_signature_and_fp16_output_cast_back(wheel, mode):
    record = wheel("legacy")
    options = AttentionOptions(fp8_quant_mode=mode, contextual_seq_len=2)
    q, k, v, offsets = inputs(LENGTHS, seed=mode)
    out = cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, options, TARGETS)
    want = fp8_hstu_attention_emulated(q, k, v, offsets, 30, 0.25, options, TARGETS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-5)
    assert record[0]["quant_mode"] == mode and record[0]["scaling_seqlen"] == 30
    assert "seqused_q" not in record[0]


def test_dispatcher_cutlass_bf16_uses_the_wheel(wheel, monkeypatch):
    record = wheel("fork")
    # The stand-in computes on CPU; the table's CUTLASS rows declare CUDA only.
    row = backends.BACKENDS["CUTLASS_FORK"]
    caps = dataclasses.replace(row.capabilities, devices=frozenset({"cpu", "cuda"}))
    monkeypatch.setitem(backends.BACKENDS, "CUTLASS_FORK", dataclasses.replace(row, capabilities=caps))
    q, k, v, offsets = inputs(LENGTHS)
    out = hstu_attention(q, k, v, offsets, 30, 0.25, AttentionOptions(), TARGETS, kernel=HSTUKernel.CUTLASS)
    assert len(record) == 1
    assert torch.equal(out, pytorch_hstu_attention(q, k, v, offsets, 30, 0.25, AttentionOptions(), TARGETS))


def test_refusals(wheel):
    q, k, v, offsets = inputs(LENGTHS)
    if not cutlass_available():
        with pytest.raises(RuntimeError, match="needs a CUTLASS HSTU wheel"):
            cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, AttentionOptions())
    wheel("no_fp8")
    with pytest.raises(ValueError, match="quant_mode"):
        cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, AttentionOptions(fp8_quant_mode=2))
    with pytest.raises(ValueError, match="func"):
        cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, AttentionOptions(sla_k1=3))
    with pytest.raises(ValueError, match="scaling_seqlen"):
        cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, AttentionOptions(scaling_seqlen=50))
    # the old wheel still runs bf16 with what it has
    cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, AttentionOptions(), TARGETS)
    wheel("fork")
    with pytest.raises(ValueError, match="float16/bfloat16"):
        cutlass_hstu_attention(q.float(), k.float(), v.float(), offsets, 30, 0.25, AttentionOptions())
    with pytest.raises(ValueError, match="attention_dim == hidden_dim"):
        cutlass_hstu_attention(q, k, v[..., :8], offsets, 30, 0.25, AttentionOptions())
    with pytest.raises(ValueError, match="window"):
        cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, AttentionOptions(max_attn_len=4), TARGETS)
    with pytest.raises(ValueError, match="min_full_attn_seq_len"):
        cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, AttentionOptions(max_attn_len=4, min_full_attn_seq_len=2))


@given(batch=jagged_batches(max_batch=5, max_len=20, with_targets=None))
def test_sla_func_tensor_equals_sla_mask(batch):
    offsets = batch.seq_offsets
    nt = batch.num_targets_tensor()
    c = batch.contextual_seq_len
    for k1, k2 in ((3, 2), (0, 4), (5, 0), (1, 1)):
        func = build_sla_func_tensor(2, k1, k2, offsets, batch.total_len, nt, contextual_seq_len=c)
        assert func.dtype == torch.int32 and func.shape == (2, 3, batch.total_len)
        n_max = batch.max_seq_len
        want = sla_attention_mask(torch.tensor(batch.lengths, dtype=torch.int64).reshape(-1), n_max, k1, k2, nt, c)
        for b, n in enumerate(batch.lengths):
            got = decode_func_mask(func, n, int(offsets[b]))
            for h in range(2):
                assert torch.equal(got[h], want[b, :n, :n])


class _CutlassAttention(torch.nn.Module):
    def forward(self, q, k, v, offsets, num_targets):
        return cutlass_hstu_attention(q, k, v, offsets, 30, 0.25, AttentionOptions(), num_targets)


def test_export_holds_one_opaque_cutlass_op_that_refuses_off_cuda(wheel):
    record = wheel("fork")
    q, k, v, offsets = (t.detach() for t in inputs(LENGTHS))
    exported = torch.export.export(_CutlassAttention(), (q, k, v, offsets, TARGETS), strict=False)
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == ["torchrec_hstu.cutlass_hstu_fwd.default"]
    assert record == []  # the wheel runs when the package runs, not while tracing
    with pytest.raises(RuntimeError, match="runs on CUDA with a CUTLASS HSTU wheel"):
        exported.module()(q, k, v, offsets, TARGETS)

