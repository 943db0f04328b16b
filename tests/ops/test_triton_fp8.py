"""Triton FP8 HSTU attention against the PyTorch FP8 emulation and the fp32 reference (device).

Two checks per case, for the forward output and each of ``dq, dk, dv``:

1. Error vs the fp32 reference (the PyTorch reference on the same bf16 inputs upcast): the
   Triton FP8 error is at most ``1.1x`` the emulation's error, in relative L2 and in max-abs
   (the max-abs check allows one bf16 rounding step of ``max|ref|`` on top, since both outputs
   are rounded to bf16 and a single element can round either way). The emulation uses the
   kernel path's backward scale granularity: per row under "fast" at head dims <= 128
   (``fp8_bwd_row_scales``), per tile otherwise; ``test_fp8_emulation.py`` holds the
   row-scaled definition to the tile-scaled one's error.
2. Agreement with the emulation itself with fp32 inputs (no output rounding): both define the
   same fp8 products, so they differ only by fp32 summation order (and the rare fp8 rounding
   flip that order can cause).

Set ``TORCHREC_HSTU_ERROR_TABLE=<path>`` to append the measured errors as JSON lines.
"""

import functools
import json
import os
from typing import Dict, List, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from strategies import jagged_batches  # noqa: E402

from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402
from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated  # noqa: E402
from torchrec_hstu.ops.fp8.quantize import FP8TileSizes  # noqa: E402
from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention  # noqa: E402

pytestmark = pytest.mark.gpu

#: Triton FP8 error may exceed the emulation's by at most this factor (issue 7).
ERROR_RATIO = 1.1
#: One bf16 rounding step, relative to max|ref| (output rounding of both implementations).
BF16_STEP = 2.0**-8
#: Triton FP8 vs emulation with fp32 inputs. A few-ulp fp32 difference in S or dS (summation
#: order, exp approximation) flips an occasional fp8 rounding of P or dS by one e4m3 step.
#: Measured on H100 (2026-11-25): at most 4.1e-4 rel-L2 / 3.8e-3 max (mode 1, D=256 and 48/80),
#: <= 1e-4 elsewhere. Hopper's fast fp8 accumulation (FP8_ACCUMULATION = "fast") gave 2.2e-3 to
#: 4.5e-3 rel-L2, so these limits still tell the two apart.
AGREE_REL_L2 = 1e-3
AGREE_MAX = 1e-2

NAMES = ("out", "dq", "dk", "dv")


def _run(fn, q, k, v, dout, offsets, max_seq_len, alpha, options, targets) -> List[torch.Tensor]:
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, offsets, max_seq_len, alpha, options, targets)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out.detach().double()] + [g.double() for g in grads]


def _triton(*args):
    """The Triton FP8 op with its default accumulation (the one the dispatcher runs)."""
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention

    return triton_fp8_hstu_attention(*args)


def _triton_precise(*args):
    """The Triton FP8 op with ``fp8_accumulation="precise"`` (exact products, exact silu)."""
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention

    return triton_fp8_hstu_attention(*args, fp8_accumulation="precise")


def _inputs(lengths, num_heads, dqk, dv, dtype, seed):
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    total = int(offsets[-1])

    def rand(d):
        return (torch.rand(total, num_heads, d, device=device, generator=gen) * 2 - 1).to(dtype)

    return offsets, rand(dqk), rand(dqk), rand(dv), rand(dv)


def _rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x - ref).norm().item() / max(ref.norm().item(), 1e-30)


def _max_rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def _record(rows: List[Dict]) -> None:
    path = os.environ.get("TORCHREC_HSTU_ERROR_TABLE")
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def check_fp8_errors(
    lengths: List[int],
    num_targets: Optional[List[int]],
    options: AttentionOptions,
    num_heads: int,
    dqk: int,
    dv: int,
    seed: int = 0,
    label: str = "",
    triton_fn=_triton,
) -> None:
    offsets, q, k, v, dout = _inputs(lengths, num_heads, dqk, dv, torch.bfloat16, seed)
    if q.shape[0] == 0:
        return
    targets = None if num_targets is None else torch.tensor(num_targets, device=q.device)
    max_seq_len = max(lengths)
    alpha = 1.0 / dqk**0.5
    args = (offsets, max_seq_len, alpha, options, targets)
    tri = _run(triton_fn, q, k, v, dout, *args)
    from torchrec_hstu.ops.triton.fp8_attention import DEFAULT_FP8_ACCUMULATION, fp8_bwd_row_scales

    accumulation = "precise" if triton_fn is _triton_precise else DEFAULT_FP8_ACCUMULATION
    tiles = FP8TileSizes.for_head_dim(max(dqk, dv), fp8_bwd_row_scales(dqk, dv, accumulation))
    emu = _run(functools.partial(fp8_hstu_attention_emulated, tile_sizes=tiles), q, k, v, dout, *args)
    ref_options = AttentionOptions(**{**options.__dict__, "fp8_quant_mode": -1})
    ref = _run(pytorch_hstu_attention, q.float(), k.float(), v.float(), dout.float(), offsets,
               max_seq_len, alpha, ref_options, targets)
    rows, failures = [], []
    for name, t, e, r in zip(NAMES, tri, emu, ref):
        assert torch.isfinite(t).all(), f"{name}: non-finite Triton FP8 values"
        t_l2, e_l2, t_max, e_max = _rel_l2(t, r), _rel_l2(e, r), _max_rel(t, r), _max_rel(e, r)
        rows.append(dict(label=label, mode=options.fp8_quant_mode, tensor=name, lengths=len(lengths),
                         tokens=int(q.shape[0]), H=num_heads, Dqk=dqk, Dv=dv,
                         triton_rel_l2=t_l2, emulation_rel_l2=e_l2, triton_max=t_max,
                         emulation_max=e_max))
        if t_l2 > ERROR_RATIO * e_l2 or t_max > ERROR_RATIO * e_max + BF16_STEP:
            failures.append(f"{name}: triton rel-L2 {t_l2:.3e} vs emulation {e_l2:.3e}; "
                            f"max {t_max:.3e} vs {e_max:.3e}")
    _record(rows)
    assert not failures, f"mode {options.fp8_quant_mode} {options}: " + "; ".join(failures)


def check_fp8_agreement(lengths, num_targets, options, num_heads, dqk, dv, seed=0) -> None:
    offsets, q, k, v, dout = _inputs(lengths, num_heads, dqk, dv, torch.float32, seed)
    if q.shape[0] == 0:
        return
    targets = None if num_targets is None else torch.tensor(num_targets, device=q.device)
    args = (offsets, max(lengths), 1.0 / dqk**0.5, options, targets)
    # Agreement to fp32 summation order is the "precise" accumulation's property; the default
    # ("fast": native fp8 accumulation, tanh silu) is held to the error bound instead.
    tri = _run(_triton_precise, q, k, v, dout, *args)
    emu = _run(fp8_hstu_attention_emulated, q, k, v, dout, *args)
    for name, t, e in zip(NAMES, tri, emu):
        l2, mx = _rel_l2(t, e), _max_rel(t, e)
        assert l2 <= AGREE_REL_L2 and mx <= AGREE_MAX, (
            f"mode {options.fp8_quant_mode} {name}: Triton FP8 vs emulation rel-L2 {l2:.2e} "
            f"(limit {AGREE_REL_L2:.0e}), max {mx:.2e} (limit {AGREE_MAX:.0e})"
        )


@st.composite
def _options(draw, contextual_seq_len: int) -> AttentionOptions:
    mode = draw(st.integers(0, 5))
    kind = draw(st.sampled_from(["causal", "causal", "window", "sla"]))
    if kind == "sla":
        return AttentionOptions(sla_k1=draw(st.sampled_from([3, 100])), sla_k2=draw(st.sampled_from([0, 5])),
                                contextual_seq_len=contextual_seq_len, fp8_quant_mode=mode)
    if kind == "window":
        return AttentionOptions(max_attn_len=draw(st.sampled_from([5, 150])),
                                contextual_seq_len=contextual_seq_len, fp8_quant_mode=mode)
    return AttentionOptions(contextual_seq_len=contextual_seq_len, fp8_quant_mode=mode)


@settings(max_examples=10)
@given(
    batch=jagged_batches(max_batch=16, max_len=400),
    data=st.data(),
    num_heads=st.integers(1, 4),
    dims=st.sampled_from([(64, 64), (128, 128)]),
    seed=st.integers(0, 2**16),
)
def test_triton_fp8_error_within_emulation(batch, data, num_heads, dims, seed) -> None:
    options = data.draw(_options(batch.contextual_seq_len))
    check_fp8_errors(batch.lengths, batch.num_targets, options, num_heads, dims[0], dims[1], seed)


@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("mode", range(6))
def test_triton_fp8_error_table(mode: int, precise: bool) -> None:
    lengths = [1000, 1, 0, 517, 256, 64, 999, 300]
    check_fp8_errors(lengths, None, AttentionOptions(fp8_quant_mode=mode), 4, 128, 128,
                     seed=mode, label="table_precise" if precise else "table",
                     triton_fn=_triton_precise if precise else _triton)


@pytest.mark.parametrize("mode", range(6))
def test_triton_fp8_agrees_with_emulation(mode: int) -> None:
    check_fp8_agreement([300, 0, 1, 129, 64], [3, 0, 1, 0, 2],
                        AttentionOptions(contextual_seq_len=2, fp8_quant_mode=mode), 2, 64, 64)


@pytest.mark.parametrize("mode", [0, 1, 2, 5])
@pytest.mark.parametrize("dqk,dv", [(256, 256), (48, 80)])
def test_triton_fp8_head_dims(mode: int, dqk: int, dv: int) -> None:
    check_fp8_errors([400, 3, 129], [2, 1, 0], AttentionOptions(fp8_quant_mode=mode), 2, dqk, dv)
    check_fp8_agreement([400, 3, 129], None, AttentionOptions(fp8_quant_mode=mode), 2, dqk, dv)


def test_triton_fp8_refuses_bf16_options() -> None:
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention

    x = torch.randn(4, 1, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp8_quant_mode"):
        triton_fp8_hstu_attention(x, x, x, torch.tensor([0, 4], device="cuda"), 4, 0.2,
                                  AttentionOptions())


def test_triton_fp8_through_dispatcher_and_compile() -> None:
    from torchrec_hstu.ops.hstu_attention import hstu_attention
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention

    device = torch.device("cuda")
    offsets = torch.tensor([0, 200, 201, 330], device=device)
    q, k, v = (torch.randn(330, 2, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    opts = AttentionOptions(fp8_quant_mode=2)
    eager = hstu_attention(q, k, v, offsets, 200, 0.125, opts, kernel="TRITON")
    direct = triton_fp8_hstu_attention(q, k, v, offsets, 200, 0.125, opts)
    torch.testing.assert_close(eager, direct, rtol=0, atol=0)

    def fn(q, k, v):
        return triton_fp8_hstu_attention(q, k, v, offsets, 200, 0.125, opts)

    compiled = torch.compile(fn, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
