"""Triton HSTU attention (bf16 / fp16 / fp32) against the PyTorch reference, on the device.

Every test needs CUDA (``@pytest.mark.gpu``) and is skipped on CI. The oracle is the PyTorch
reference evaluated in float32 on the same (rounded) inputs; the Triton kernel must be within
the stated tolerances for the forward output and for each of ``dq, dk, dv``:

* ``||x - ref|| / ||ref|| <= REL_L2[dtype]`` (relative Frobenius error), and
* ``max|x - ref| <= MAX_ABS[dtype] * max|ref|``.
"""

import json
import os
from typing import Dict, Optional, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from strategies import jagged_batches  # noqa: E402
from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402
from torchrec_hstu.ops.hstu_attention import hstu_attention  # noqa: E402
from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention  # noqa: E402

pytestmark = pytest.mark.gpu

#: Tolerances of the Triton kernels against the fp32 reference (P and dS are rounded to the
#: input dtype before their matrix products, as in every flash-style kernel).
REL_L2: Dict[torch.dtype, float] = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-4}
MAX_ABS: Dict[torch.dtype, float] = {torch.bfloat16: 4e-2, torch.float16: 8e-3, torch.float32: 3e-4}

DIM_PAIRS = [(64, 64), (128, 128), (48, 80)]


def _errors(x: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    x, ref = x.double(), ref.double()
    if ref.numel() == 0:
        return 0.0, 0.0
    denom = max(ref.norm().item(), 1e-30)
    rel = (x - ref).norm().item() / denom
    max_rel = (x - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    return rel, max_rel


def _check(name: str, x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    rel, max_rel = _errors(x, ref)
    assert rel <= REL_L2[dtype] and max_rel <= MAX_ABS[dtype], (
        f"{name}: relative L2 error {rel:.2e} (limit {REL_L2[dtype]:.0e}), max error "
        f"{max_rel:.2e} of max|ref| (limit {MAX_ABS[dtype]:.0e})"
    )


def _compare(
    lengths,
    num_targets: Optional[list],
    options: AttentionOptions,
    num_heads: int,
    dqk: int,
    dv: int,
    dtype: torch.dtype,
    seed: int = 0,
    max_seq_len: Optional[int] = None,
    record: bool = False,
) -> None:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    total = int(offsets[-1])
    max_seq_len = max_seq_len or max([1] + lengths)
    targets = None if num_targets is None else torch.tensor(num_targets, device=device)

    def rand(d: int) -> torch.Tensor:
        return (torch.rand(total, num_heads, d, device=device, generator=gen) * 2 - 1).to(dtype)

    q, k, v = rand(dqk), rand(dqk), rand(dv)
    dout = rand(dv)
    alpha = 1.0 / dqk**0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = hstu_attention(*leaves, offsets, max_seq_len, alpha, options, targets, kernel="TRITON")
    grads = torch.autograd.grad(out, leaves, dout) if total else (q, k, v)

    ref_leaves = [x.float().requires_grad_() for x in (q, k, v)]
    ref = pytorch_hstu_attention(*ref_leaves, offsets, max_seq_len, alpha, options, targets)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float()) if total else (q, k, v)

    assert out.dtype == dtype and out.shape == (total, num_heads, dv)
    rows = []
    for name, x, r in zip(("out", "dq", "dk", "dv"), (out,) + tuple(grads), (ref,) + tuple(ref_grads)):
        assert x.dtype == dtype
        _check(name, x, r, dtype)
        rel, max_rel = _errors(x, r)
        rows.append(dict(label="bf16", dtype=str(dtype), tensor=name, tokens=total, H=num_heads,
                         Dqk=dqk, Dv=dv, rel_l2=rel, max_rel=max_rel, options=repr(options)))
    path = os.environ.get("TORCHREC_HSTU_ERROR_TABLE")
    if path and record:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


@st.composite
def _mask_options(draw, contextual_seq_len: int) -> AttentionOptions:
    kind = draw(st.sampled_from(["causal", "causal", "window", "sla", "full"]))
    scaling = draw(st.sampled_from([-1, -1, 300]))
    if kind == "sla":
        return AttentionOptions(
            sla_k1=draw(st.sampled_from([0, 3, 40, 200])),
            sla_k2=draw(st.sampled_from([1, 5, 64])),
            contextual_seq_len=contextual_seq_len,
            scaling_seqlen=scaling,
        )
    if kind == "window":
        return AttentionOptions(
            max_attn_len=draw(st.sampled_from([1, 7, 100])),
            min_full_attn_seq_len=draw(st.sampled_from([0, 0, 5, 90])),
            contextual_seq_len=contextual_seq_len,
            scaling_seqlen=scaling,
        )
    return AttentionOptions(
        causal=kind != "full", contextual_seq_len=contextual_seq_len, scaling_seqlen=scaling
    )


@settings(max_examples=24)
@given(
    batch=jagged_batches(max_batch=64, max_len=700),
    data=st.data(),
    num_heads=st.integers(1, 8),
    dims=st.sampled_from(DIM_PAIRS),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_bf16(batch, data, num_heads, dims, seed) -> None:
    options = data.draw(_mask_options(batch.contextual_seq_len))
    _compare(batch.lengths, batch.num_targets, options, num_heads, dims[0], dims[1],
             torch.bfloat16, seed)


@pytest.mark.parametrize("dqk,dv", [(32, 32), (256, 256), (128, 64), (64, 256)])
@pytest.mark.parametrize("with_targets", [False, True])
def test_triton_head_dims(dqk: int, dv: int, with_targets: bool) -> None:
    lengths = [0, 1, 129, 1000, 511, 64]
    targets = [0, 1, 5, 17, 0, 64] if with_targets else None
    _compare(lengths, targets, AttentionOptions(), 2, dqk, dv, torch.bfloat16)


@pytest.mark.parametrize("dim", [128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_error_table(dim: int, dtype: torch.dtype) -> None:
    lengths = [1000, 1, 0, 517, 256, 64, 999, 300]
    _compare(lengths, None, AttentionOptions(), 4, dim, dim, dtype, record=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_other_dtypes(dtype: torch.dtype) -> None:
    lengths = [3, 0, 300, 77]
    _compare(lengths, [1, 0, 4, 2], AttentionOptions(contextual_seq_len=2, max_attn_len=50), 2,
             64, 64, dtype)


def test_triton_long_sequences_and_padding_independence() -> None:
    # A fixed scaling_seqlen makes the output independent of the batch max_seq_len.
    lengths = [4096, 1, 2500]
    opts = AttentionOptions(scaling_seqlen=4096)
    _compare(lengths, None, opts, 4, 128, 128, torch.bfloat16, max_seq_len=4096)
    _compare(lengths, None, opts, 4, 128, 128, torch.bfloat16, max_seq_len=5000)


def test_triton_empty_batch() -> None:
    _compare([0, 0], None, AttentionOptions(), 2, 64, 64, torch.bfloat16)
    _compare([], None, AttentionOptions(), 2, 64, 64, torch.bfloat16)


def test_triton_refuses_what_it_cannot_run() -> None:
    from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

    offsets = torch.tensor([0, 4], device="cuda")
    x64 = torch.randn(4, 1, 16, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        triton_hstu_attention(x64, x64, x64, offsets, 4, 0.25, AttentionOptions())
    xcpu = torch.randn(4, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        triton_hstu_attention(xcpu, xcpu, xcpu, offsets.cpu(), 4, 0.25, AttentionOptions())
    x = torch.randn(4, 1, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp8"):
        triton_hstu_attention(x, x, x, offsets, 4, 0.25, AttentionOptions(fp8_quant_mode=2))


def test_triton_op_compiles_and_exports() -> None:
    from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

    device = torch.device("cuda")
    offsets = torch.tensor([0, 100, 100, 350], device=device)
    q, k, v = (torch.randn(350, 2, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    opts = AttentionOptions(contextual_seq_len=3)
    targets = torch.tensor([2, 0, 5], device=device)

    def fn(q, k, v):
        return triton_hstu_attention(q, k, v, offsets, 250, 0.125, opts, targets)

    eager = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.compile(fn, fullgraph=True)(*leaves).float().square().sum().backward()
    eager_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    fn(*eager_leaves).float().square().sum().backward()
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-4)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return fn(q, k, v)

    exported = torch.export.export(M(), (q, k, v))
    assert "triton_hstu_attention_fwd" in str(exported.graph)
    torch.testing.assert_close(exported.module()(q, k, v), eager, rtol=0, atol=0)

