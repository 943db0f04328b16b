"""Triton FP8 (float8_e4m3fn) jagged HSTU attention, forward and backward, ``fp8_quant_mode`` 0..5.

Same definition as the PyTorch emulation (:mod:`torchrec_hstu.ops.fp8.emulation`, notes
decision 5), with quantizers bit-identical to the emulation's (the fused Triton
:func:`torchrec_hstu.ops.triton.fp8_quantize.triton_quantize_for_mode`, equal to
:func:`torchrec_hstu.ops.fp8.quantize.quantize_for_mode`) and the same tile sizes
(:class:`~torchrec_hstu.ops.fp8.quantize.FP8TileSizes`):

Forward, per query block and key tile ``n`` of ``fwd_block_n`` keys::

    S  = fp8 tl.dot(q8, k8^T) * (q_descale x k_descale) * alpha      (modes 1..5; mode 0: no scales)
    P  = silu(S) (exact sigmoid), masked
    s_P per 16 query rows x tile = max(amax|P| / 448, 1e-6);  P8 = sat_e4m3(P / s_P)
    O += fp8 tl.dot(P8, v8[n]) * (s_P * v_descale[n])
    O /= scaling_seqlen

Backward, per key block of ``bwd_block_n`` (128) keys and query tile of ``bwd_block_m`` (64):
``S, P, dP = dO8 v8^T * descales, dS = dP * silu'(S)``, ``P`` and ``dS`` re-quantized per whole
tile, ``dV += P8^T dO8c``, ``dK += dS8^T q8c``, ``dQ += dS8 k8c`` (fp32 atomics), each scaled by
the tile scale times the column descale of the tile (mode 1: per-d vector). Under "fast" at head
dims <= 128 (:func:`fp8_bwd_row_scales`) P and dS are scaled per row of the tile instead: per
key for dV and dK, per query over 64 keys (``bwd_dq_block_n``) for dQ, which then comes from
the dQ kernel. Launch layouts
(the autotuner picks): one key-parallel launch for dV, dK and dQ; two (dV; dK with dQ); or dK
and dV without atomics and a query-parallel dQ kernel that walks the same tiles from the query
side. On SM90 the key-parallel launches read the per-tile q, dO and their transposes through TMA
descriptors and add dQ with bulk reductions, which keeps per-element pointer tensors out of
their registers (ptxas, D=128: the one-launch layout's spills 388 -> 116 B per thread, which
made it the fastest there; D=256 (dK, dQ): 1404 -> 484 B). Under the default "fast" accumulation the
sigmoid is ``tanh.approx``'s and modes 2..5, whose descales are one number per tile, let the
tensor core accumulate dK / dV in place (``RESCALE``): together 2.2x faster at N=8192 (H200),
held to the same float64 error bound as the forward.

Hopper's fp8 wgmma reads K-major operands, so the tensors on the "token" side of a product
(``v`` forward; ``q``, ``k``, ``dO`` column-quantized backward) are passed transposed
(``[H, D, L]``), a copy made right after quantization.

Symbols: ``B`` batch, ``L`` tokens, ``H`` heads, ``Dqk``/``Dv`` head dims.
"""

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.custom_ops import (
    ATTENTION_TENSORS,
    attention_output_fake,
    define_attention_op,
    register_attention_autograd,
)
from torchrec_hstu.ops.triton._common import (
    bwd_tile_ranges,
    ceil_div,
    fwd_tile_ranges,
    interpret_mode,
    next_power_of_2,
    seq_num_targets,
    seq_span,
    tanh_approx,
    tile_segment,
    to_e4m3_saturated,
    valid_mask,
)
from torchrec_hstu.ops.triton.hstu_attention import (
    GRADIENTS,
    KernelConfig,
    _block_dim,
    _MaskArgs,
    _seq_class,
    check_triton_inputs,
    choose_config,
    gradient_outputs,
    mask_args_of,
    run_backward_layout,
)

if TYPE_CHECKING:
    from torchrec_hstu.ops.fp8.quantize import FP8Quantized

logger = logging.getLogger(__name__)

#: Accumulation choices of the fp8 ``tl.dot``s (the ``fp8_accumulation`` argument). Hopper's
#: fp8 wgmma accumulates in reduced precision; exact fp8 products summed in fp32 need the
#: operands upcast to fp16 (exact for e4m3) and 16-bit tensor cores.
#:
#: * ``"fast"`` (default): Hopper's native fp8 wgmma for every product, and in the forward
#:   ``silu`` through ``tanh.approx.f32`` (``silu(x) = h + h tanh(h)``, ``h = x / 2``), as the
#:   CUTLASS kernel computes it; at head dims <= 128 the backward scales P and dS per row of
#:   the tile (:func:`fp8_bwd_row_scales`); the quantizers multiply by the reciprocal descale
#:   (:func:`~torchrec_hstu.ops.triton.fp8_quantize.triton_quantize_for_mode`). Error vs the
#:   float64 reference within 1.1x the emulation's (the bound of notes decision 5; measured by
#:   ``benchmarks/fp8_fwd_speed.py``), the emulation with the same backward scale granularity;
#:   the row-scaled definition's relative-L2 error is below the tile-scaled one's (0.96-0.99x),
#:   its element-wise max error 0.76-1.16x of it
#:   (``benchmarks/results/2026-12-03-cpu-fp8-row-scale-errors.json``).
#: * ``"mixed"``: exact products for the score products (``q k^T``, ``dO v^T``, whose results are
#:   re-quantized, where a tiny error flips fp8 roundings of P / dS), native fp8 for the value
#:   products (``P v``, ``P^T dO``, ``dS^T q``, ``dS k``); exact sigmoid and exact quantizers.
#: * ``"precise"``: every product exact (fp16 upcast, fp32 accumulation), the exact sigmoid and
#:   the quantizers' exact division: equal to the PyTorch emulation up to fp32 summation order
#:   (tested).
#:
#: The choice is always the caller's: nothing here switches it.
FP8_ACCUMULATIONS = ("precise", "mixed", "fast")
DEFAULT_FP8_ACCUMULATION = "fast"


def check_fp8_accumulation(fp8_accumulation: str) -> None:
    """``ValueError`` unless ``fp8_accumulation`` is one of :data:`FP8_ACCUMULATIONS`."""
    if fp8_accumulation not in FP8_ACCUMULATIONS:
        raise ValueError(
            f"fp8_accumulation must be one of {FP8_ACCUMULATIONS}; got {fp8_accumulation!r}")


def _max_imprecise(score_product: bool, fp8_accumulation: str = DEFAULT_FP8_ACCUMULATION) -> Optional[int]:
    check_fp8_accumulation(fp8_accumulation)
    precise = fp8_accumulation == "precise" or (fp8_accumulation == "mixed" and score_product)
    # 0: exact products (the kernels upcast the fp8 tiles to fp16); None: native fp8 wgmma.
    return 0 if precise else None


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.jit
def _to_e4m3(x, INTERPRET: tl.constexpr):
    """Saturating fp32 -> e4m3 cast. On the GPU Triton emits ``cvt.rn.satfinite.e4m3x2.f32``,
    which saturates by itself, so the clamp of ``to_e4m3_saturated`` is left out."""
    if INTERPRET:
        return to_e4m3_saturated(x, INTERPRET)
    return x.to(tl.float8e4nv)


@triton.jit
def _fp8_fwd_tile(
    acc, r_prev, q, qd, K_base, KD_base, VT_base, VD_base, j0, offs_m, offs_n, offs_dqk, offs_dv,
    stride_kn, stride_kdn, stride_vtd, stride_vdn, stride_vdd, n, vn, T, c, W, M, sla_k1, K2,
    alpha,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, P_ROWS: tl.constexpr, QUANT_MODE: tl.constexpr,
    MASK_MODE: tl.constexpr, MASKED: tl.constexpr, INTERPRET: tl.constexpr,
    MAX_IMPRECISE: tl.constexpr, MAX_IMPRECISE_S: tl.constexpr, FAST_SILU: tl.constexpr,
    SCALAR_QD: tl.constexpr, SCALAR_KVD: tl.constexpr, RESCALE: tl.constexpr,
):
    """One key tile ``[j0, j0 + BLOCK_N)`` of the FP8 forward; returns ``(acc, r_prev)``.

    ``qd``: the q descale (``[BLOCK_M]`` vector, or a scalar if ``SCALAR_QD``; under
    ``FAST_SILU`` it already carries ``alpha / 2``). ``SCALAR_KVD``: the k and v descales are
    one value per key tile (modes 2..5, tiles aligned to the quantizer's blocks). ``vn``: the
    bound of the key columns read from the transposed v (``n`` rounded up to 16 for the aligned
    layout, whose padding columns are zeros, so the mask stays 16 columns wide and the loads
    vectorize). ``MAX_IMPRECISE(_S) == 0`` ("precise"): the fp8 tiles are upcast to fp16 (exact)
    and multiplied on 16-bit tensor cores with fp32 accumulation, i.e. exact fp8 products
    summed in fp32 (Triton lowers an fp8 dot with ``max_num_imprecise_acc=0`` to ``mma.sync``).

    ``RESCALE`` (modes 2..5, fast accumulation): ``acc`` holds ``O / r_prev`` row-wise, where
    ``r = s_P * v_descale`` is the last tile's per-row factor; each tile rescales ``acc`` by
    ``r_prev / r`` and lets the tensor core accumulate ``P8 @ v8`` into it, so no second
    ``[BLOCK_M, Dv]`` fp32 product tile is live (registers, occupancy); the caller multiplies by
    the final ``r_prev``. One fp32 rounding per tile more than the definition's order.
    """
    j0 = tl.multiple_of(j0, 16)
    cols = j0 + offs_n
    col_in = cols < n
    k_ptrs = K_base + cols[:, None] * stride_kn + offs_dqk[None, :]
    vt_ptrs = VT_base + offs_dv[:, None] * stride_vtd + cols[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=col_in[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
        vt = tl.load(vt_ptrs, mask=(offs_dv[:, None] < DV) & (cols < vn)[None, :], other=0.0)
    elif BLOCK_DQK != DQK or BLOCK_DV != DV:
        k = tl.load(k_ptrs, mask=offs_dqk[None, :] < DQK, other=0.0)
        vt = tl.load(vt_ptrs, mask=offs_dv[:, None] < DV, other=0.0)
    else:
        k = tl.load(k_ptrs)
        vt = tl.load(vt_ptrs)
    if MAX_IMPRECISE_S == 0:
        s = tl.dot(q, tl.trans(k.to(tl.float16)))
    else:
        s = tl.dot(q, tl.trans(k), max_num_imprecise_acc=MAX_IMPRECISE_S)
    # Dequantize, scale by alpha (FAST_SILU: alpha / 2, folded into qd), silu.
    if QUANT_MODE == 0:
        if FAST_SILU:
            x = s * (alpha * 0.5)
        else:
            x = s * alpha
    elif SCALAR_KVD:
        kd = tl.load(KD_base + j0 * stride_kdn)
        if FAST_SILU:
            if SCALAR_QD:
                x = s * (qd * kd)
            else:
                x = s * (qd * kd)[:, None]
        else:
            if SCALAR_QD:
                x = s * (qd * kd) * alpha
            else:
                x = s * (qd * kd)[:, None] * alpha
    else:
        kd = tl.load(KD_base + cols * stride_kdn, mask=col_in, other=1.0)
        if FAST_SILU:
            x = s * qd[:, None] * kd[None, :]
        else:
            x = s * (qd[:, None] * kd[None, :]) * alpha
    if FAST_SILU:
        if INTERPRET:
            p = 2.0 * x * tl.sigmoid(2.0 * x)
        else:
            t = tanh_approx(x)
            p = x + x * t
    else:
        p = x * tl.sigmoid(x)
    if MASKED:
        valid = valid_mask(offs_m[:, None], cols[None, :], n, T, c, W, M, sla_k1, K2, MASK_MODE)
        p = tl.where(valid, p, 0.0)
    if QUANT_MODE == 0:
        p8 = _to_e4m3(p, INTERPRET)
        if MAX_IMPRECISE == 0:
            acc = tl.dot(p8.to(tl.float16), tl.trans(vt.to(tl.float16)), acc)
        else:
            acc = tl.dot(p8, tl.trans(vt), acc, max_num_imprecise_acc=MAX_IMPRECISE)
    else:
        row_max = tl.max(tl.abs(p), axis=1)
        group_max = tl.max(tl.reshape(row_max, (BLOCK_M // P_ROWS, P_ROWS)), axis=1)
        p_scale = tl.maximum(group_max / 448.0, 1e-6)
        row_scale = tl.reshape(
            tl.broadcast_to(p_scale[:, None], (BLOCK_M // P_ROWS, P_ROWS)), (BLOCK_M,))
        p8 = _to_e4m3(p * (1.0 / row_scale)[:, None], INTERPRET)
        if RESCALE:
            r = row_scale * tl.load(VD_base + j0 * stride_vdn)
            acc = tl.dot(p8, tl.trans(vt), acc * (r_prev / r)[:, None],
                         max_num_imprecise_acc=MAX_IMPRECISE)
            r_prev = r
        elif MAX_IMPRECISE == 0:
            pv = tl.dot(p8.to(tl.float16), tl.trans(vt.to(tl.float16)))
        else:
            pv = tl.dot(p8, tl.trans(vt), max_num_imprecise_acc=MAX_IMPRECISE)
        if RESCALE:
            pass
        elif SCALAR_KVD:
            vd = tl.load(VD_base + j0 * stride_vdn)
            acc += pv * (row_scale * vd)[:, None]
        else:
            vd = tl.load(VD_base + j0 * stride_vdn + offs_dv * stride_vdd, mask=offs_dv < DV,
                         other=1.0)
            acc += pv * (row_scale[:, None] * vd[None, :])
    return acc, r_prev


@triton.jit
def _fp8_fwd_block(
    q, qd, K, KD, VT, VD, start, vstart, h, stride_km, stride_kh, stride_kdm, stride_kdh,
    stride_vth, stride_vtd, stride_vdm, stride_vdh, stride_vdd, m0, n, vn, T, c, W, M, sla_k1,
    K2, alpha,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, P_ROWS: tl.constexpr,
    QUANT_MODE: tl.constexpr, MASK_MODE: tl.constexpr, INTERPRET: tl.constexpr,
    MAX_IMPRECISE: tl.constexpr, MAX_IMPRECISE_S: tl.constexpr, FAST_SILU: tl.constexpr,
    SCALAR_QD: tl.constexpr, SCALAR_KVD: tl.constexpr, RESCALE: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_DV]`` fp32 output (before ``1 / scaling_seqlen``) of the loaded fp8
    query rows ``q`` (descales ``qd``, see :func:`_fp8_fwd_tile`) at positions
    ``m0 .. m0 + BLOCK_M`` of the sequence, head ``h``: every key tile the mask can reach.
    ``vstart``: the sequence's first column in ``VT``; ``vn``: its column bound."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    K_base = K + start * stride_km + h * stride_kh
    KD_base = KD + start * stride_kdm + h * stride_kdh
    VT_base = VT + h * stride_vth + vstart
    VD_base = VD + start * stride_vdm + h * stride_vdh
    if MAX_IMPRECISE_S == 0:
        q = q.to(tl.float16)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    r_prev = tl.full([BLOCK_M], 1.0, tl.float32)
    ta0, ta1, tb0, ti0, ti1, tb1 = fwd_tile_ranges(
        m0, n, T, c, W, M, sla_k1, K2, MASK_MODE, BLOCK_M, BLOCK_N)
    for SEGMENT in tl.static_range(4):
        lo, hi = tile_segment(SEGMENT, ta0, ta1, tb0, ti0, ti1, tb1)
        for j0 in range(lo, hi, BLOCK_N):
            acc, r_prev = _fp8_fwd_tile(acc, r_prev, q, qd, K_base, KD_base, VT_base, VD_base, j0, offs_m, offs_n,
                                offs_dqk, offs_dv, stride_km, stride_kdm, stride_vtd, stride_vdm,
                                stride_vdd, n, vn, T, c, W, M, sla_k1, K2, alpha, DQK, DV,
                                BLOCK_M, BLOCK_DQK, BLOCK_DV, P_ROWS, QUANT_MODE, MASK_MODE,
                                SEGMENT != 2, INTERPRET, MAX_IMPRECISE, MAX_IMPRECISE_S,
                                FAST_SILU, SCALAR_QD, SCALAR_KVD, RESCALE)
    if RESCALE:
        acc = acc * r_prev[:, None]
    return acc


@triton.jit
def _fp8_fwd_query_block(
    q, qd, K, KD, VT, VD, start, h, stride_km, stride_kh, stride_kdm, stride_kdh, stride_vth,
    stride_vtd, stride_vdm, stride_vdh, stride_vdd, m0, n, T, c, W, M, sla_k1, K2, alpha,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, P_ROWS: tl.constexpr,
    QUANT_MODE: tl.constexpr, MASK_MODE: tl.constexpr, INTERPRET: tl.constexpr,
    MAX_IMPRECISE: tl.constexpr, MAX_IMPRECISE_S: tl.constexpr,
):
    """The query-block loop with per-token descale vectors, exact silu and ``VT`` from
    :func:`_transposed` (sequence columns at ``start``): the delta (KV-cached) kernel's entry."""
    return _fp8_fwd_block(
        q, qd, K, KD, VT, VD, start, start, h, stride_km, stride_kh, stride_kdm, stride_kdh,
        stride_vth, stride_vtd, stride_vdm, stride_vdh, stride_vdd, m0, n, n, T, c, W, M,
        sla_k1, K2, alpha, DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N, P_ROWS, QUANT_MODE,
        MASK_MODE, INTERPRET, MAX_IMPRECISE, MAX_IMPRECISE_S, False, False, False, False)


@triton.jit
def _fp8_fwd_kernel(
    Q, QD, K, KD, VT, VD, Out, seq_offsets, num_targets,
    stride_qm, stride_qh, stride_qdm, stride_qdh, stride_km, stride_kh, stride_kdm, stride_kdh,
    stride_vth, stride_vtd, stride_vdm, stride_vdh, stride_vdd, stride_om, stride_oh,
    alpha, out_scale,
    c, W, M, sla_k1, K2,
    H,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, P_ROWS: tl.constexpr,
    QUANT_MODE: tl.constexpr, MASK_MODE: tl.constexpr, HAS_TARGETS: tl.constexpr,
    INTERPRET: tl.constexpr, MAX_IMPRECISE: tl.constexpr, MAX_IMPRECISE_S: tl.constexpr,
    FAST_SILU: tl.constexpr = False, SCALAR_QD: tl.constexpr = False,
    SCALAR_KVD: tl.constexpr = False, VT_ALIGNED: tl.constexpr = False,
    RESCALE: tl.constexpr = False,
):
    """FP8 forward, one program per (query block, sequence, head).

    ``VT_ALIGNED``: ``VT`` is :func:`_transposed_aligned`'s layout (sequence ``b`` at column
    :func:`_vt_start` ``= 16 * (ceil(start / 16) + b)``, zeros up to ``n`` rounded to 16);
    otherwise :func:`_transposed`'s (column ``start``)."""
    pid_bh = tl.program_id(0)
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start, n = seq_span(seq_offsets, b)
    m0 = m_block * BLOCK_M
    if m0 >= n:
        return
    T = seq_num_targets(num_targets, b, HAS_TARGETS)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_in = offs_m < n
    q = tl.load(Q + start * stride_qm + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_dqk[None, :], mask=row_in[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    if QUANT_MODE == 0:
        qd = 1.0
    elif SCALAR_QD:
        qd = tl.load(QD + (start + m0) * stride_qdm + h * stride_qdh)
    else:
        qd = tl.load(QD + start * stride_qdm + h * stride_qdh + offs_m * stride_qdm, mask=row_in,
                     other=1.0)
    if FAST_SILU:
        qd = qd * (alpha * 0.5)
    if VT_ALIGNED:
        vstart = _vt_start(start, b)
        vn = (n + 15) // 16 * 16
    else:
        vstart = start
        vn = n
    acc = _fp8_fwd_block(
        q, qd, K, KD, VT, VD, start, vstart, h, stride_km, stride_kh, stride_kdm, stride_kdh,
        stride_vth, stride_vtd, stride_vdm, stride_vdh, stride_vdd, m0, n, vn, T, c, W, M,
        sla_k1, K2, alpha, DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N, P_ROWS, QUANT_MODE,
        MASK_MODE, INTERPRET, MAX_IMPRECISE, MAX_IMPRECISE_S, FAST_SILU, SCALAR_QD, SCALAR_KVD,
        RESCALE)
    o_ptrs = Out + start * stride_om + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, (acc * out_scale).to(Out.dtype.element_ty),
             mask=row_in[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _vt_start(start, b):
    """First column of sequence ``b`` (token offset ``start``) in the aligned transposed layout:
    a multiple of 16, and ``_vt_start(b + 1) >= _vt_start(b) + round_up(n_b, 16)``."""
    return ((start + 15) // 16 + b) * 16


@triton.jit
def _transpose_kernel(
    X, XT, seq_offsets, stride_xm, stride_xh, stride_th, stride_td, H, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``X [L, H, D]`` (fp8) -> ``XT [H, D, C]`` with sequence ``b`` at columns
    ``_vt_start(start_b, b) ..`` and zeros up to the next sequence's first column (the last
    sequence: up to ``C``), so every column is written: TMA boxes read past a sequence."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    start, n = seq_span(seq_offsets, b)
    t0 = tl.program_id(1) * BLOCK_T
    span = _vt_start(start + n, b + 1) - _vt_start(start, b)
    if t0 >= span:
        return
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(X + (start + offs_t[:, None]) * stride_xm + h * stride_xh + offs_d[None, :],
                mask=(offs_t[:, None] < n) & (offs_d[None, :] < D), other=0.0)
    col = _vt_start(start, b) + offs_t
    tl.store(XT + h * stride_th + offs_d[:, None] * stride_td + col[None, :], tl.trans(x),
             mask=(offs_d[:, None] < D) & (offs_t < span)[None, :])


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@triton.jit
def _tile_quant(x, QUANT_MODE: tl.constexpr, INTERPRET: tl.constexpr):
    """One scale for the whole tile (mode 0: saturating cast, scale 1)."""
    if QUANT_MODE == 0:
        return to_e4m3_saturated(x, INTERPRET), 1.0
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0) / 448.0, 1e-6)
    return to_e4m3_saturated(x * (1.0 / scale), INTERPRET), scale


@triton.jit
def _row_quant(x, QUANT_MODE: tl.constexpr, INTERPRET: tl.constexpr):
    """One scale per row of the tile, ``[R, 1]`` (mode 0: saturating cast, scale 1). In the
    wgmma accumulator layout a row lies within one warp: no exchange across warps."""
    # One return statement: Triton checks every return's type, in pruned branches too.
    if QUANT_MODE == 0:
        scale = tl.full([x.shape[0], 1], 1.0, tl.float32)
        x8 = to_e4m3_saturated(x, INTERPRET)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), axis=1, keep_dims=True) / 448.0, 1e-6)
        x8 = to_e4m3_saturated(x * (1.0 / scale), INTERPRET)
    return x8, scale


@triton.jit
def _scores_quant(x, QUANT_MODE: tl.constexpr, ROW_SCALES: tl.constexpr, INTERPRET: tl.constexpr):
    """P or dS in fp8 with its scale: per row (:func:`_row_quant`) or per tile."""
    if ROW_SCALES:
        x8, scale = _row_quant(x, QUANT_MODE, INTERPRET)
    else:
        x8, scale = _tile_quant(x, QUANT_MODE, INTERPRET)
    return x8, scale


@triton.jit
def _fp8_bwd_sigmoid(s, FAST_SILU: tl.constexpr, INTERPRET: tl.constexpr):
    """``sigmoid(s)``; under ``FAST_SILU`` (fast accumulation) as ``(1 + tanh(s / 2)) / 2`` by
    ``tanh.approx`` (one MUFU op instead of exp + divide; the interpreter has no PTX)."""
    if FAST_SILU and not INTERPRET:
        return 0.5 + 0.5 * tanh_approx(0.5 * s)
    return tl.sigmoid(s)


@triton.jit
def _fp8_bwd_tile(
    dk, dv, rk, rv, k, kd, v, vd, kct, kdc, m0,
    q_ptrs, qd_ptrs, do_ptrs, dod_ptrs, qct_ptrs, qdc_ptrs, doct_ptrs, dodc_ptrs, dq_ptrs,
    dq_desc, start, tstart, q_col, do_col,
    offs_m, offs_n, offs_dqk, offs_dv,
    stride_qm, stride_qdm, stride_dom, stride_dodm, stride_qdcm, stride_qdcd,
    stride_dodcm, stride_dodcd, stride_dqm,
    n, tn, T, c, W, M, sla_k1, K2, alpha,
    DQK: tl.constexpr, DV: tl.constexpr, QUANT_MODE: tl.constexpr, MASK_MODE: tl.constexpr,
    MASKED: tl.constexpr, COMPUTE_DV: tl.constexpr, COMPUTE_DKDQ: tl.constexpr,
    INTERPRET: tl.constexpr, MAX_IMPRECISE: tl.constexpr, MAX_IMPRECISE_S: tl.constexpr,
    FAST_SILU: tl.constexpr, ATOMIC_DQ: tl.constexpr, RESCALE: tl.constexpr,
    USE_TMA: tl.constexpr, TMA_REDUCE: tl.constexpr, ROW_SCALES: tl.constexpr,
):
    """One query tile ``[m0, m0 + BLOCK_M)`` of the FP8 backward. ``tn``: the bound of the token
    columns read from the transposed ``qct`` / ``doct`` (``n`` rounded up to 16 for the aligned
    layout, see :func:`_transposed_aligned`).

    ``RESCALE`` (modes 2..5, whose column descales are one number per query tile): ``dv``
    holds ``dV / rv`` and ``dk`` holds ``dK / rk``, where ``rv``/``rk`` are the last tile's
    factors (tile scale x column descale; ``[BLOCK_N, 1]`` under ``ROW_SCALES``); each tile
    rescales the accumulator by ``r_prev / r`` and the tensor core accumulates into it, so no
    second ``[BLOCK_N, D]`` fp32 product tile is live (without it the 8-warp launches spill 1-2 KB per thread). The kernel
    multiplies by the final factors. One fp32 rounding per tile more than the definition's
    order.

    ``USE_TMA``: ``q_ptrs``, ``do_ptrs``, ``qct_ptrs``, ``doct_ptrs`` are tensor descriptors of
    the whole 2-D views (rows ``[L, H * D]``, transposed ``[H * D, C]``; column / row offsets
    ``q_col``, ``do_col`` select the head; ``start``, ``tstart`` the sequence), and under ``TMA_REDUCE``
    ``dq_desc`` adds dQ with a bulk reduction: no per-element pointer tensors live across the
    loop (ptxas, mode 2: the one launch at D=128 spilled 388 B per thread by pointers, 116 B
    with descriptors)."""
    m0 = tl.multiple_of(m0, 16)
    rows = m0 + offs_m
    row_in = rows < n
    if USE_TMA:
        # Rows past the sequence belong to the next one (or are zero past the tensor):
        # masked segments zero their P / dS columns; interior tiles have none.
        q = q_ptrs.load([start + m0, q_col])
    else:
        q = tl.load(q_ptrs + m0 * stride_qm, mask=row_in[:, None] & (offs_dqk[None, :] < DQK),
                    other=0.0)
    sT = tl.dot(k, tl.trans(q), max_num_imprecise_acc=MAX_IMPRECISE_S)
    if RESCALE:
        # Modes 2..5: the tile's q rows share one descale (``kd`` is the key block's).
        sT = sT * (kd * tl.load(qd_ptrs + m0 * stride_qdm))
    elif QUANT_MODE != 0:
        qd = tl.load(qd_ptrs + rows * stride_qdm, mask=row_in, other=1.0)
        sT = sT * (kd[:, None] * qd[None, :])
    sT = sT * alpha
    sigT = _fp8_bwd_sigmoid(sT, FAST_SILU, INTERPRET)
    pT = sT * sigT
    if MASKED:
        valid = valid_mask(rows[None, :], offs_n[:, None], n, T, c, W, M, sla_k1, K2, MASK_MODE)
        if USE_TMA:
            # valid_mask leaves rows past n to the loads' zeros, which TMA boxes do not give.
            valid = valid & row_in[None, :]
        pT = tl.where(valid, pT, 0.0)
    if COMPUTE_DV:
        # Rows of pT are keys: a row scale is constant along the dV product's reduction.
        p8T, p_scale = _scores_quant(pT, QUANT_MODE, ROW_SCALES, INTERPRET)
        if USE_TMA:
            doct = doct_ptrs.load([do_col, tstart + m0])
        else:
            doct = tl.load(doct_ptrs + m0, mask=(offs_dv[:, None] < DV) & (rows < tn)[None, :],
                           other=0.0)
        if RESCALE:
            r = p_scale * tl.load(dodc_ptrs + m0 * stride_dodcm)
            dv = tl.dot(p8T, tl.trans(doct), dv * (rv / r), max_num_imprecise_acc=MAX_IMPRECISE)
            rv = r
        elif QUANT_MODE == 0:
            dv = tl.dot(p8T, tl.trans(doct), dv, max_num_imprecise_acc=MAX_IMPRECISE)
        else:
            pdo = tl.dot(p8T, tl.trans(doct), max_num_imprecise_acc=MAX_IMPRECISE)
            dodc = tl.load(dodc_ptrs + m0 * stride_dodcm + offs_dv * stride_dodcd,
                           mask=offs_dv < DV, other=1.0)
            dv += pdo * (p_scale * dodc[None, :])
    if COMPUTE_DKDQ:
        if USE_TMA:
            do = do_ptrs.load([start + m0, do_col])
        else:
            do = tl.load(do_ptrs + m0 * stride_dom, mask=row_in[:, None] & (offs_dv[None, :] < DV),
                         other=0.0)
        dpT = tl.dot(v, tl.trans(do), max_num_imprecise_acc=MAX_IMPRECISE_S)
        if RESCALE:
            dpT = dpT * (vd * tl.load(dod_ptrs + m0 * stride_dodm))
        elif QUANT_MODE != 0:
            dod = tl.load(dod_ptrs + rows * stride_dodm, mask=row_in, other=1.0)
            dpT = dpT * (vd[:, None] * dod[None, :])
        dsT = dpT * (sigT * (1.0 + sT * (1.0 - sigT)))
        if MASKED:
            dsT = tl.where(valid, dsT, 0.0)
        ds8T, ds_scale = _scores_quant(dsT, QUANT_MODE, ROW_SCALES, INTERPRET)
        if USE_TMA:
            qct = qct_ptrs.load([q_col, tstart + m0])
        else:
            qct = tl.load(qct_ptrs + m0, mask=(offs_dqk[:, None] < DQK) & (rows < tn)[None, :],
                          other=0.0)
        if RESCALE:
            r = ds_scale * tl.load(qdc_ptrs + m0 * stride_qdcm)
            dk = tl.dot(ds8T, tl.trans(qct), dk * (rk / r), max_num_imprecise_acc=MAX_IMPRECISE)
            rk = r
        elif QUANT_MODE == 0:
            dk = tl.dot(ds8T, tl.trans(qct), dk, max_num_imprecise_acc=MAX_IMPRECISE)
        else:
            dsq = tl.dot(ds8T, tl.trans(qct), max_num_imprecise_acc=MAX_IMPRECISE)
            qdc = tl.load(qdc_ptrs + m0 * stride_qdcm + offs_dqk * stride_qdcd,
                          mask=offs_dqk < DQK, other=1.0)
            dk += dsq * (ds_scale * qdc[None, :])
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds8T), tl.trans(kct), max_num_imprecise_acc=MAX_IMPRECISE)
            if QUANT_MODE != 0:
                dq = dq * (ds_scale * kdc[None, :])
            if TMA_REDUCE:
                # Rows past the sequence add exact zeros (their dS columns are masked).
                dq_desc.atomic_add([start + m0, q_col], dq)
            else:
                tl.atomic_add(dq_ptrs + m0 * stride_dqm, dq,
                              mask=row_in[:, None] & (offs_dqk[None, :] < DQK), sem="relaxed")
    return dk, dv, rk, rv


@triton.jit
def _fp8_bwd_kernel(
    Q, QD, K, KD, V, VD, DO, DOD, QCT, QDC, KCT, KDC, DOCT, DODC, DQ, DK, DV, seq_offsets,
    num_targets, DQ_DESC,
    stride_qm, stride_qh, stride_qdm, stride_qdh, stride_km, stride_kh, stride_kdm, stride_kdh,
    stride_vm, stride_vh, stride_vdm, stride_vdh, stride_dom, stride_doh, stride_dodm,
    stride_dodh, stride_qcth, stride_qctd, stride_qdcm, stride_qdch, stride_qdcd,
    stride_kcth, stride_kctd, stride_kdcm, stride_kdch, stride_kdcd,
    stride_docth, stride_doctd, stride_dodcm, stride_dodch, stride_dodcd,
    stride_dqm, stride_dqh, stride_dkm, stride_dkh, stride_dvm, stride_dvh,
    alpha, dk_scale, dv_scale,
    c, W, M, sla_k1, K2,
    H,
    DQK: tl.constexpr, DV_DIM: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT_MODE: tl.constexpr, MASK_MODE: tl.constexpr, HAS_TARGETS: tl.constexpr,
    COMPUTE_DV: tl.constexpr, COMPUTE_DKDQ: tl.constexpr, INTERPRET: tl.constexpr,
    MAX_IMPRECISE: tl.constexpr, MAX_IMPRECISE_S: tl.constexpr, T_ALIGNED: tl.constexpr = False,
    FAST_SILU: tl.constexpr = False, ATOMIC_DQ: tl.constexpr = True, RESCALE: tl.constexpr = False,
    USE_TMA: tl.constexpr = False, TMA_REDUCE: tl.constexpr = False,
    ROW_SCALES: tl.constexpr = False,
):
    """FP8 backward, one program per (key block, sequence, head). ``T_ALIGNED``: ``QCT``,
    ``KCT``, ``DOCT`` are in :func:`_transposed_aligned`'s layout (else :func:`_transposed`'s).
    ``USE_TMA`` (``T_ALIGNED`` too): ``Q``, ``DO``, ``QCT``, ``DOCT`` are tensor descriptors
    (see :func:`_fp8_bwd_tile`); ``TMA_REDUCE``: ``DQ_DESC`` is ``DQ``'s. ``ROW_SCALES``: P
    and dS scaled per key (``FP8TileSizes.bwd_row_scales``); dQ then needs the dQ kernel,
    whose dS scales run along queries."""
    tl.static_assert(not (ROW_SCALES and ATOMIC_DQ), "row scales: dQ by the dQ kernel")
    pid_bh = tl.program_id(0)
    n_block = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start, n = seq_span(seq_offsets, b)
    n0 = n_block * BLOCK_N
    if n0 >= n:
        return
    T = seq_num_targets(num_targets, b, HAS_TARGETS)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_in = offs_n < n
    if T_ALIGNED:
        tstart = _vt_start(start, b)
        tn = (n + 15) // 16 * 16
    else:
        tstart = start
        tn = n
    k = tl.load(K + start * stride_km + h * stride_kh + offs_n[:, None] * stride_km
                + offs_dqk[None, :], mask=col_in[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    # Modes 2..5 under RESCALE: one descale per key block (k and v are quantized in blocks of
    # BLOCK_N keys or coarser).
    TILE_SCALAR: tl.constexpr = RESCALE and QUANT_MODE >= 2
    if TILE_SCALAR:
        kd = tl.load(KD + start * stride_kdm + h * stride_kdh + n0 * stride_kdm)
    else:
        kd = tl.load(KD + start * stride_kdm + h * stride_kdh + offs_n * stride_kdm, mask=col_in,
                     other=1.0)
    if COMPUTE_DKDQ:
        v = tl.load(V + start * stride_vm + h * stride_vh + offs_n[:, None] * stride_vm
                    + offs_dv[None, :], mask=col_in[:, None] & (offs_dv[None, :] < DV_DIM),
                    other=0.0)
        if TILE_SCALAR:
            vd = tl.load(VD + start * stride_vdm + h * stride_vdh + n0 * stride_vdm)
        else:
            vd = tl.load(VD + start * stride_vdm + h * stride_vdh + offs_n * stride_vdm,
                         mask=col_in, other=1.0)
        kct = tl.load(KCT + h * stride_kcth + tstart + offs_dqk[:, None] * stride_kctd
                      + offs_n[None, :], mask=(offs_dqk[:, None] < DQK) & (offs_n < tn)[None, :],
                      other=0.0)
        kdc = tl.load(KDC + (start + n0) * stride_kdcm + h * stride_kdch + offs_dqk * stride_kdcd,
                      mask=offs_dqk < DQK, other=1.0)
        dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    else:
        v = k
        vd = kd
        kct = k
        kdc = kd
        dk = tl.zeros([1, 1], dtype=tl.float32)
    if COMPUTE_DV:
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    else:
        dv = tl.zeros([1, 1], dtype=tl.float32)
    if ROW_SCALES:
        rk = tl.full([BLOCK_N, 1], 1.0, tl.float32)
        rv = tl.full([BLOCK_N, 1], 1.0, tl.float32)
    else:
        rk = tl.full([], 1.0, tl.float32)
        rv = tl.full([], 1.0, tl.float32)
    qd_ptrs = QD + start * stride_qdm + h * stride_qdh
    dod_ptrs = DOD + start * stride_dodm + h * stride_dodh
    qdc_ptrs = QDC + start * stride_qdcm + h * stride_qdch
    dodc_ptrs = DODC + start * stride_dodcm + h * stride_dodch
    dq_ptrs = DQ + start * stride_dqm + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_dqk[None, :]
    if USE_TMA:
        q_ptrs = Q
        do_ptrs = DO
        qct_ptrs = QCT
        doct_ptrs = DOCT
    else:
        q_ptrs = Q + start * stride_qm + h * stride_qh + offs_m[:, None] * stride_qm + offs_dqk[None, :]
        do_ptrs = DO + start * stride_dom + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :]
        qct_ptrs = QCT + h * stride_qcth + tstart + offs_dqk[:, None] * stride_qctd + offs_m[None, :]
        doct_ptrs = DOCT + h * stride_docth + tstart + offs_dv[:, None] * stride_doctd + offs_m[None, :]
    ta0, ta1, tb0, ti0, ti1, tb1 = bwd_tile_ranges(
        n0, n, T, c, W, M, sla_k1, K2, MASK_MODE, BLOCK_M, BLOCK_N)
    for SEGMENT in tl.static_range(4):
        lo, hi = tile_segment(SEGMENT, ta0, ta1, tb0, ti0, ti1, tb1)
        for m0 in range(lo, hi, BLOCK_M):
            dk, dv, rk, rv = _fp8_bwd_tile(
                dk, dv, rk, rv, k, kd, v, vd, kct, kdc, m0, q_ptrs, qd_ptrs, do_ptrs, dod_ptrs, qct_ptrs,
                qdc_ptrs, doct_ptrs, dodc_ptrs, dq_ptrs, DQ_DESC, start.to(tl.int32),
                tstart.to(tl.int32), h * DQK, h * DV_DIM, offs_m, offs_n, offs_dqk, offs_dv,
                stride_qm, stride_qdm, stride_dom, stride_dodm, stride_qdcm, stride_qdcd,
                stride_dodcm, stride_dodcd, stride_dqm, n, tn, T, c, W, M, sla_k1, K2, alpha,
                DQK, DV_DIM, QUANT_MODE, MASK_MODE, SEGMENT != 2, COMPUTE_DV, COMPUTE_DKDQ,
                INTERPRET, MAX_IMPRECISE, MAX_IMPRECISE_S, FAST_SILU, ATOMIC_DQ, TILE_SCALAR,
                USE_TMA, TMA_REDUCE, ROW_SCALES)
    if COMPUTE_DKDQ:
        tl.store(DK + start * stride_dkm + h * stride_dkh + offs_n[:, None] * stride_dkm
                 + offs_dqk[None, :], (dk * (rk * dk_scale)).to(DK.dtype.element_ty),
                 mask=col_in[:, None] & (offs_dqk[None, :] < DQK))
    if COMPUTE_DV:
        tl.store(DV + start * stride_dvm + h * stride_dvh + offs_n[:, None] * stride_dvm
                 + offs_dv[None, :], (dv * (rv * dv_scale)).to(DV.dtype.element_ty),
                 mask=col_in[:, None] & (offs_dv[None, :] < DV_DIM))


@triton.jit
def _fp8_dq_tile(
    acc, r_prev, q, qd, do, dod, K_base, KD_base, V_base, VD_base, KCT_base, KDC_base, j0,
    offs_m, offs_n, offs_dqk, offs_dv, stride_km, stride_kdm, stride_vm, stride_vdm,
    stride_kctd, stride_kdcm, stride_kdcd, n, tn, T, c, W, M, sla_k1, K2, alpha,
    DQK: tl.constexpr, DV: tl.constexpr, QUANT_MODE: tl.constexpr, MASK_MODE: tl.constexpr,
    MASKED: tl.constexpr, INTERPRET: tl.constexpr, MAX_IMPRECISE: tl.constexpr,
    MAX_IMPRECISE_S: tl.constexpr, FAST_SILU: tl.constexpr, TILE_SCALAR: tl.constexpr,
    ROW_SCALES: tl.constexpr,
):
    """One key tile ``[j0, j0 + BLOCK_N)`` of the FP8 dQ. With tile scales it is the (query
    tile x key tile) of the key-parallel backward seen from the query side, so ``dS`` and its
    tile scale are the same numbers (the amax runs over the same elements). ``ROW_SCALES``:
    ``BLOCK_N`` is ``FP8TileSizes.bwd_dq_block_n`` (64, half the key-parallel tile), one dS
    scale per query (row) over it, constant along this product's reduction."""
    j0 = tl.multiple_of(j0, 16)
    cols = j0 + offs_n
    col_in = cols < n
    k = tl.load(K_base + cols[:, None] * stride_km + offs_dqk[None, :],
                mask=col_in[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    v = tl.load(V_base + cols[:, None] * stride_vm + offs_dv[None, :],
                mask=col_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
    s = tl.dot(q, tl.trans(k), max_num_imprecise_acc=MAX_IMPRECISE_S)
    dp = tl.dot(do, tl.trans(v), max_num_imprecise_acc=MAX_IMPRECISE_S)
    if TILE_SCALAR:
        s = s * (qd * tl.load(KD_base + j0 * stride_kdm))
        dp = dp * (dod * tl.load(VD_base + j0 * stride_vdm))
    elif QUANT_MODE != 0:
        kd = tl.load(KD_base + cols * stride_kdm, mask=col_in, other=1.0)
        vd = tl.load(VD_base + cols * stride_vdm, mask=col_in, other=1.0)
        s = s * (qd[:, None] * kd[None, :])
        dp = dp * (dod[:, None] * vd[None, :])
    s = s * alpha
    sig = _fp8_bwd_sigmoid(s, FAST_SILU, INTERPRET)
    ds = dp * (sig * (1.0 + s * (1.0 - sig)))
    if MASKED:
        valid = valid_mask(offs_m[:, None], cols[None, :], n, T, c, W, M, sla_k1, K2, MASK_MODE)
        ds = tl.where(valid, ds, 0.0)
    ds8, ds_scale = _scores_quant(ds, QUANT_MODE, ROW_SCALES, INTERPRET)
    kct = tl.load(KCT_base + offs_dqk[:, None] * stride_kctd + cols[None, :],
                  mask=(offs_dqk[:, None] < DQK) & (cols < tn)[None, :], other=0.0)
    if TILE_SCALAR:
        # As the key-parallel RESCALE: acc holds dQ / r_prev, the tensor core accumulates.
        r = ds_scale * tl.load(KDC_base + j0 * stride_kdcm)
        acc = tl.dot(ds8, tl.trans(kct), acc * (r_prev / r), max_num_imprecise_acc=MAX_IMPRECISE)
        r_prev = r
    elif QUANT_MODE == 0:
        acc = tl.dot(ds8, tl.trans(kct), acc, max_num_imprecise_acc=MAX_IMPRECISE)
    else:
        kdc = tl.load(KDC_base + j0 * stride_kdcm + offs_dqk * stride_kdcd, mask=offs_dqk < DQK,
                      other=1.0)
        acc += (tl.dot(ds8, tl.trans(kct), max_num_imprecise_acc=MAX_IMPRECISE)
                * (ds_scale * kdc[None, :]))
    return acc, r_prev


@triton.jit
def _fp8_bwd_dq_kernel(
    Q, QD, K, KD, V, VD, DO, DOD, KCT, KDC, DQ, seq_offsets, num_targets,
    stride_qm, stride_qh, stride_qdm, stride_qdh, stride_km, stride_kh, stride_kdm, stride_kdh,
    stride_vm, stride_vh, stride_vdm, stride_vdh, stride_dom, stride_doh, stride_dodm,
    stride_dodh, stride_kcth, stride_kctd, stride_kdcm, stride_kdch, stride_kdcd,
    stride_dqm, stride_dqh,
    alpha, dq_scale,
    c, W, M, sla_k1, K2,
    H,
    DQK: tl.constexpr, DV_DIM: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT_MODE: tl.constexpr, MASK_MODE: tl.constexpr, HAS_TARGETS: tl.constexpr,
    INTERPRET: tl.constexpr, MAX_IMPRECISE: tl.constexpr, MAX_IMPRECISE_S: tl.constexpr,
    FAST_SILU: tl.constexpr, RESCALE: tl.constexpr, ROW_SCALES: tl.constexpr = False,
):
    """FP8 dQ, one program per (query tile, sequence, head), no atomics: the forward's walk
    over key tiles (``KCT`` in :func:`_transposed_aligned`'s layout). The key-parallel launch
    computes dK and dV with ``ATOMIC_DQ`` off."""
    pid_bh = tl.program_id(0)
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start, n = seq_span(seq_offsets, b)
    m0 = m_block * BLOCK_M
    if m0 >= n:
        return
    T = seq_num_targets(num_targets, b, HAS_TARGETS)
    tstart = _vt_start(start, b)
    tn = (n + 15) // 16 * 16
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_in = offs_m < n
    q = tl.load(Q + start * stride_qm + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_dqk[None, :], mask=row_in[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    do = tl.load(DO + start * stride_dom + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :], mask=row_in[:, None] & (offs_dv[None, :] < DV_DIM), other=0.0)
    qd_base = QD + start * stride_qdm + h * stride_qdh
    dod_base = DOD + start * stride_dodm + h * stride_dodh
    TILE_SCALAR: tl.constexpr = RESCALE and QUANT_MODE >= 2
    if TILE_SCALAR:
        qd = tl.load(qd_base + m0 * stride_qdm)
        dod = tl.load(dod_base + m0 * stride_dodm)
    else:
        qd = tl.load(qd_base + offs_m * stride_qdm, mask=row_in, other=1.0)
        dod = tl.load(dod_base + offs_m * stride_dodm, mask=row_in, other=1.0)
    K_base = K + start * stride_km + h * stride_kh
    KD_base = KD + start * stride_kdm + h * stride_kdh
    V_base = V + start * stride_vm + h * stride_vh
    VD_base = VD + start * stride_vdm + h * stride_vdh
    KCT_base = KCT + h * stride_kcth + tstart
    KDC_base = KDC + start * stride_kdcm + h * stride_kdch
    acc = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    if ROW_SCALES:
        r_prev = tl.full([BLOCK_M, 1], 1.0, tl.float32)
    else:
        r_prev = tl.full([], 1.0, tl.float32)
    ta0, ta1, tb0, ti0, ti1, tb1 = fwd_tile_ranges(
        m0, n, T, c, W, M, sla_k1, K2, MASK_MODE, BLOCK_M, BLOCK_N)
    for SEGMENT in tl.static_range(4):
        lo, hi = tile_segment(SEGMENT, ta0, ta1, tb0, ti0, ti1, tb1)
        for j0 in range(lo, hi, BLOCK_N):
            acc, r_prev = _fp8_dq_tile(
                acc, r_prev, q, qd, do, dod, K_base, KD_base, V_base, VD_base, KCT_base,
                KDC_base, j0, offs_m, offs_n, offs_dqk, offs_dv, stride_km, stride_kdm,
                stride_vm, stride_vdm, stride_kctd, stride_kdcm, stride_kdcd, n, tn, T, c, W,
                M, sla_k1, K2, alpha, DQK, DV_DIM, QUANT_MODE, MASK_MODE, SEGMENT != 2,
                INTERPRET, MAX_IMPRECISE, MAX_IMPRECISE_S, FAST_SILU, TILE_SCALAR, ROW_SCALES)
    tl.store(DQ + start * stride_dqm + h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_dqk[None, :], (acc * (r_prev * dq_scale)).to(DQ.dtype.element_ty),
             mask=row_in[:, None] & (offs_dqk[None, :] < DQK))


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _fp8_block_dim(d: int) -> int:
    # fp8 wgmma consumes K in steps of 32.
    return max(32, _block_dim(d))


def _transposed(values: torch.Tensor) -> torch.Tensor:
    """``[L, H, D]`` -> contiguous ``[H, D, L]`` (K-major operand for fp8 ``tl.dot``)."""
    return values.permute(1, 2, 0).contiguous()


def _row_strides(token_descale: torch.Tensor) -> Tuple[int, int]:
    """Strides (token, head) of a per-token descale ``[L, H, 1]`` (broadcast views allowed)."""
    return token_descale.stride(0), token_descale.stride(1)


def _vec_strides(token_descale: torch.Tensor) -> Tuple[int, int, int]:
    """Strides (token, head, d) of ``[L, H, 1]`` or ``[L, H, D]`` descales (d stride 0 if 1)."""
    d_stride = token_descale.stride(2) if token_descale.shape[2] > 1 else 0
    return token_descale.stride(0), token_descale.stride(1), d_stride


@dataclasses.dataclass(frozen=True)
class FP8KernelConfig(KernelConfig):
    """:class:`KernelConfig` plus a register cap per thread (``maxnreg``; None: ptxas's
    choice). Capping the FP8 forward at 168 registers lets three 4-warp programs share an SM."""

    maxnreg: Optional[int] = None


def _launch_extras(cfg: KernelConfig) -> dict:
    maxnreg = getattr(cfg, "maxnreg", None)
    return {} if maxnreg is None or interpret_mode() else dict(maxnreg=maxnreg)


def fp8_fwd_candidates(dqk: int, dv: int, fp8_accumulation: str = DEFAULT_FP8_ACCUMULATION) -> list:
    """Forward configs (``block_n`` is fixed by the FP8 definition and ignored here)."""
    if interpret_mode():
        return [KernelConfig(32, 0, 4, 1)]
    if max(dqk, dv) <= 128:
        if fp8_accumulation == "fast":
            # fp8 wgmma: one warpgroup per 64 query rows. H200 (2026-12-02, B=16, modes 2 and 5):
            # 64/4/3 the fastest at N=4096 (0.51-0.52 ms), 128/8/3 at N=8192 (1.96-1.97 ms);
            # 128/8/2 (one program per SM: 232 registers) and 64/4/2 slower.
            return [KernelConfig(64, 0, 4, 3), KernelConfig(128, 0, 8, 3)]
        # Exact products on 16-bit wgmma (fp16 upcast): 64/4/3 spills, 128/8/2 does not.
        return [KernelConfig(128, 0, 8, 2)]
    if fp8_accumulation == "fast":
        # H200 (2026-12-03, B=16, N=8192, kernel alone, modes 2 / 5): 128/8/3 3.29 / 3.34 ms
        # (1.42x / 1.40x our bf16), 128/8/2 4.36, 64/4/2 4.50 / 4.72, 64/4/1 4.54 / 4.46,
        # 128/8/1 5.76 / 5.62. ptxas: 241-245 registers, no spills at 128/8/*; 64/4/2-3 spill.
        # 128/8/3 needs 132 KB of shared memory, more than SM89 / SM120 give a program, so it
        # is second: the autotuner (N >= 512) takes it where it fits, the untuned default is
        # the config that fits everywhere.
        return [KernelConfig(128, 0, 8, 2), KernelConfig(128, 0, 8, 3)]
    # 128/8/2 beat 64/4/2 and 128/8/1 for D = 256 (H100, 2026-11-25).
    return [KernelConfig(128, 0, 8, 2)]


def fp8_bwd_row_scales(dqk: int, dv: int, fp8_accumulation: str = DEFAULT_FP8_ACCUMULATION) -> bool:
    """Whether the FP8 backward scales P and dS per row (``FP8TileSizes.bwd_row_scales``)
    instead of per tile: under "fast" accumulation at head dims up to 128.

    H200 (2026-12-03, B=16, N=8192, D=128, whole backward with the re-quantizations,
    autotuned): 8.76-8.87 ms with row scales vs 9.78 with tile scales; ncu of the tile-scaled
    one-launch kernel: 18% of stall samples at barriers, and replacing both tile maxima by a
    constant scale saved 2.1 of 11.4 ms. At D = 256 row scales were no faster (27.3 vs 26.9
    ms) and mode 1's dQ max error exceeded 1.1x the emulation's (5.7e-2 vs 4.5e-2), so the
    tile scales stay there."""
    return fp8_accumulation == "fast" and max(dqk, dv) <= 128


def fp8_bwd_candidates(dqk: int, dv: int, fp8_accumulation: str = DEFAULT_FP8_ACCUMULATION) -> list:
    """Backward configs (tile sizes fixed by the FP8 definition; warps, stages, split vary).

    With row scales (:func:`fp8_bwd_row_scales`) dQ comes from the query-parallel dQ kernel,
    so every candidate has ``dq`` set; the dQ kernel runs one warpgroup per 64-query tile (4
    warps: a query's row lies within one warp). H200 (2026-12-03, B=16, N=8192, D=128, mode
    2, whole backward, dQ over 64-key tiles): key-parallel 8:3 with dQ 4:3 8.33 ms, 8:3 with
    4:2 8.54, 8:4 with 4:2 8.66, 8:2 with 4:3 8.77, 8:2 with 4:2 9.08 (mode 5: 8.13, 8.47,
    8.50, 8.41, 8.99); any dQ at 8 warps 11.2-13.9 (dropped). Key-parallel alone (profiler):
    8:3 4.71 ms, 8:2 5.19. Split 8:1 fits 99 KB of shared memory: last."""
    if fp8_bwd_row_scales(dqk, dv, fp8_accumulation):
        if interpret_mode():
            return [KernelConfig(0, 0, 4, 1, split_bwd=True, dq=KernelConfig(0, 0, 4, 1))]
        return [KernelConfig(0, 0, 8, 3, dq=KernelConfig(0, 0, 4, 3)),
                KernelConfig(0, 0, 8, 3, dq=KernelConfig(0, 0, 4, 2)),
                KernelConfig(0, 0, 8, 4, dq=KernelConfig(0, 0, 4, 2)),
                KernelConfig(0, 0, 8, 2, dq=KernelConfig(0, 0, 4, 3)),
                KernelConfig(0, 0, 8, 2, dq=KernelConfig(0, 0, 4, 2)),
                KernelConfig(0, 0, 8, 1, split_bwd=True, dq=KernelConfig(0, 0, 4, 1))]
    # Tile scales (as the CUTLASS kernel): "precise" / "mixed", and "fast" at D = 256.
    if interpret_mode():
        return [KernelConfig(0, 0, 4, 1)]
    # Measured on H100 (2026-11-25): split beat fused by 1.8x at D = 128 (6.5 vs 11.8 ms,
    # N=2048), with every operand read by pointer tensors. Since the key-parallel launch reads
    # q, dO and their transposes through TMA descriptors and adds dQ with bulk reductions
    # (SM90), ptxas (sm90, mode 2, fast accumulation, the launch's stride divisibility) counts
    # 116 B of spills per thread in the one-launch layout (388 B by pointers; the split
    # launches spill none either way at D = 128), and the one launch is the fastest: H200
    # (2026-12-03, B=16, D=128, mode 2, whole backward with the re-quantizations): 10.8 / 3.03
    # ms at N=8192 / 4096, vs 13.1 / 3.65 split (13.7 / 3.84 split by pointers, the previous
    # default) and 19-20 / 5.1-5.3 with the dQ kernel. At D = 256 the one launch spills ~4.8
    # KB (58 ms) and split 8/2 does not fit in shared memory: split 8/1 26.9 ms (34.5 by
    # pointers), with the dQ kernel 29.3 (28.4 by pointers); the autotuner chooses.
    # Last, split 8/1 (1.6x the one launch's time on the H200 at N=8192) is the layout that
    # fits 99 KB of shared memory (static: 32 / 80 KB; SM89, SM120), where the others do not:
    # choose_config takes the first that fits (untested on such a GPU).
    if max(dqk, dv) <= 128:
        return [KernelConfig(0, 0, 8, 2), KernelConfig(0, 0, 8, 3),
                KernelConfig(0, 0, 8, 2, split_bwd=True), KernelConfig(0, 0, 8, 1, split_bwd=True)]
    return [KernelConfig(0, 0, 8, 1, split_bwd=True),
            KernelConfig(0, 0, 8, 1, split_bwd=True, dq=KernelConfig(0, 0, 8, 1))]


def fp8_bwd_tma_supported(q8: torch.Tensor, dqk: int, dv: int,
                          fp8_accumulation: str = DEFAULT_FP8_ACCUMULATION) -> bool:
    """Whether the FP8 backward reads its per-tile operands through TMA descriptors: on SM90+
    (or in the interpreter, loads only, when asked), head dims that are their own tile width
    (TMA boxes cannot mask columns), and 16-byte-aligned, contiguous ``[L, H, D]`` tensors.
    At D = 256 only under "fast" accumulation: with fp16-promoted products (the other two) the
    (dK, dQ) launch's TMA buffers need 256 KB of shared memory (H200: 227 KB)."""
    return (
        dqk == _fp8_block_dim(dqk) and dv == _fp8_block_dim(dv) and q8.is_contiguous()
        and (max(dqk, dv) <= 128 or fp8_accumulation == "fast")
        and q8.data_ptr() % 16 == 0
        and (interpret_mode() or (q8.is_cuda and torch.cuda.get_device_capability(q8.device) >= (9, 0)))
    )


def _rows_descriptor(values: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """Descriptor of contiguous ``[L, H, D]`` as ``[L, H * D]``, boxes of ``block_rows x D``."""
    length, heads, dim = values.shape
    return TensorDescriptor(values, [length, heads * dim], [heads * dim, 1], [block_rows, dim])


def _columns_descriptor(values: torch.Tensor, block_cols: int) -> TensorDescriptor:
    """Descriptor of contiguous ``[H, D, C]`` (transposed) as ``[H * D, C]``, boxes of
    ``D x block_cols``."""
    heads, dim, cols = values.shape
    return TensorDescriptor(values, [heads * dim, cols], [cols, 1], [dim, block_cols])


def _transposed_aligned(values: torch.Tensor, seq_offsets: torch.Tensor,
                        max_seq_len: int) -> torch.Tensor:
    """``[L, H, D]`` fp8 -> ``[H, D, C]`` with each sequence starting at a column that is a
    multiple of 16 (:func:`_vt_start`) and zeros between sequences (every column written), so
    the forward reads the K-major v operand with 16-byte loads whatever the sequence offsets
    and the backward's TMA boxes may overrun a sequence. ``C = 16 * (ceil(L / 16) + B)``;
    nothing is read back to the host."""
    total, num_heads, dim = values.shape
    batch = seq_offsets.numel() - 1
    cols = 16 * (ceil_div(total, 16) + batch)
    out = torch.empty((num_heads, dim, cols), dtype=values.dtype, device=values.device)
    block_t = 64
    # A sequence's columns with the zeros after it: at most its length + 47.
    grid = (batch * num_heads, ceil_div(max_seq_len + 47, block_t))
    _transpose_kernel[grid](values, out, seq_offsets, values.stride(0), values.stride(1),
                            out.stride(0), out.stride(1), num_heads, dim, BLOCK_T=block_t,
                            BLOCK_D=next_power_of_2(dim), num_warps=4)
    return out


#: Benchmark-only overrides of the forward kernel's constexprs (``FAST_SILU``, ``SCALAR_QD``,
#: ``SCALAR_KVD``), to time one change at a time; empty in normal use.
_FWD_OVERRIDES: dict = {}


class FP8ForwardInputs:
    """q, k, v quantized for the FP8 forward (what :func:`fp8_fwd_kernel` consumes)."""

    def __init__(self, q_q, k_q, v_q, vt: torch.Tensor) -> None:
        self.q_q, self.k_q, self.v_q, self.vt = q_q, k_q, v_q, vt


def _batch_quantizer(seq_offsets: torch.Tensor, max_seq_len: int, fp8_quant_mode: int, chunk: int,
                     exact: bool):
    """``quantize(x, block, colwise=False)`` for the operands of one batch: the fused Triton
    quantizers, with each tile's block offsets (modes 1 column-wise and 2) computed once and
    shared between operands (fewer small ops per call, host time in eager calls)."""
    from torchrec_hstu.ops.fp8.quantize import sequence_block_offsets
    from torchrec_hstu.ops.triton.fp8_quantize import triton_quantize_for_mode

    shared: dict = {}

    def quantize(x: torch.Tensor, block: int, colwise: bool = False):
        colwise = colwise and fp8_quant_mode == 1
        block_offsets = None
        if colwise or fp8_quant_mode == 2:
            tile = chunk if colwise else block
            if tile not in shared:
                shared[tile] = sequence_block_offsets(seq_offsets, tile)
            block_offsets = shared[tile]
        return triton_quantize_for_mode(x, seq_offsets, fp8_quant_mode, block, colwise=colwise,
                                        chunk=chunk, max_seq_len=max_seq_len, exact=exact,
                                        block_offsets=block_offsets)

    return quantize


def fp8_fwd_quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     seq_offsets: torch.Tensor, max_seq_len: int,
                     fp8_quant_mode: int, exact: bool = False) -> FP8ForwardInputs:
    """Quantize ``q, k, v`` for ``fp8_quant_mode`` with the forward tiles (fused Triton
    quantizers; with ``exact`` bit-identical to
    :func:`~torchrec_hstu.ops.fp8.quantize.quantize_for_mode`) and lay ``v`` out transposed
    (:func:`_transposed_aligned`)."""
    from torchrec_hstu.ops.fp8.quantize import FP8TileSizes

    tiles = FP8TileSizes.for_head_dim(max(q.shape[2], v.shape[2]))
    quantize = _batch_quantizer(seq_offsets, max_seq_len, fp8_quant_mode, tiles.colwise_chunk, exact)
    q_q = quantize(q, tiles.fwd_block_m)
    k_q = quantize(k, tiles.fwd_block_n)
    v_q = quantize(v, tiles.fwd_block_n, colwise=True)
    return FP8ForwardInputs(q_q, k_q, v_q, _transposed_aligned(v_q.values, seq_offsets, max_seq_len))


def fp8_fwd_kernel(
    inputs: FP8ForwardInputs,
    out_dtype: torch.dtype,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    mask: _MaskArgs,
    fp8_quant_mode: int,
    config: Optional[KernelConfig] = None,
    fp8_accumulation: str = DEFAULT_FP8_ACCUMULATION,
) -> torch.Tensor:
    """The FP8 forward kernel alone on quantized inputs (:func:`fp8_fwd_quantize`);
    ``[L, H, Dv]`` in ``out_dtype``."""
    from torchrec_hstu.ops.fp8.quantize import FP8TileSizes

    check_fp8_accumulation(fp8_accumulation)
    q_q, k_q, v_q, vt = inputs.q_q, inputs.k_q, inputs.v_q, inputs.vt
    q8, k8 = q_q.values, k_q.values
    total, num_heads, dqk = q8.shape
    dv = v_q.values.shape[2]
    out = torch.empty((total, num_heads, dv), dtype=out_dtype, device=q8.device)
    batch = seq_offsets.numel() - 1
    if total == 0 or batch == 0:
        return out.zero_()
    tiles = FP8TileSizes.for_head_dim(max(dqk, dv))
    block_dqk, block_dv = _fp8_block_dim(dqk), _fp8_block_dim(dv)
    mode = fp8_quant_mode

    def run(cfg: KernelConfig) -> None:
        grid = (batch * num_heads, ceil_div(max_seq_len, cfg.block_m))
        flags = dict(
            FAST_SILU=fp8_accumulation == "fast",
            SCALAR_QD=mode >= 3 or (mode == 2 and tiles.fwd_block_m % cfg.block_m == 0),
            SCALAR_KVD=mode >= 2,
            # H100 (2026-12-02, N=8192, modes 2 and 5): 128/8/3 1.87 ms with RESCALE vs 1.93
            # without; at N=4096 64/4/3 within 0.5% either way.
            RESCALE=fp8_accumulation == "fast")
        flags.update(_FWD_OVERRIDES)
        flags["RESCALE"] = flags["RESCALE"] and flags["SCALAR_KVD"] and mode >= 2
        flags.update(_launch_extras(cfg))
        _fp8_fwd_kernel[grid](
            q8, q_q.token_descale, k8, k_q.token_descale, vt, v_q.token_descale, out, seq_offsets,
            num_targets if num_targets is not None else seq_offsets,
            q8.stride(0), q8.stride(1), *_row_strides(q_q.token_descale),
            k8.stride(0), k8.stride(1), *_row_strides(k_q.token_descale),
            vt.stride(0), vt.stride(1), *_vec_strides(v_q.token_descale),
            out.stride(0), out.stride(1),
            alpha, 1.0 / scaling_seqlen,
            mask.c, mask.w, mask.m, mask.sla_k1, mask.k2,
            num_heads,
            DQK=dqk, DV=dv, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
            BLOCK_M=cfg.block_m, BLOCK_N=tiles.fwd_block_n, P_ROWS=tiles.fwd_p_rows,
            QUANT_MODE=mode, MASK_MODE=mask.mode, HAS_TARGETS=mask.has_targets,
            INTERPRET=interpret_mode(), MAX_IMPRECISE=_max_imprecise(False, fp8_accumulation),
            MAX_IMPRECISE_S=_max_imprecise(True, fp8_accumulation),
            VT_ALIGNED=True, **flags,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if config is None:
        key = ("fp8_fwd", mode, fp8_accumulation, out_dtype, block_dqk, block_dv,
               mask.mode, _seq_class(max_seq_len))
        config = choose_config(key, functools.partial(fp8_fwd_candidates, dqk, dv, fp8_accumulation),
                               max_seq_len, run)
    run(config)
    return out


def fp8_fwd_and_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    mask: _MaskArgs,
    fp8_quant_mode: int,
    config: Optional[KernelConfig] = None,
    fp8_accumulation: str = DEFAULT_FP8_ACCUMULATION,
) -> Tuple[torch.Tensor, Optional[FP8ForwardInputs]]:
    """Quantize ``q, k, v`` for ``fp8_quant_mode`` (:func:`fp8_fwd_quantize`) and run the FP8
    forward (:func:`fp8_fwd_kernel`): ``(out [L, H, Dv] in the dtype of q, the quantized
    inputs)``; the inputs are None for an empty batch. :func:`fp8_bwd` can reuse those whose
    quantization the backward shares (:func:`fp8_forward_quantized_for_backward`)."""
    check_fp8_accumulation(fp8_accumulation)
    total, num_heads, _ = q.shape
    batch = seq_offsets.numel() - 1
    if total == 0 or batch == 0:
        return torch.zeros((total, num_heads, v.shape[2]), dtype=q.dtype, device=q.device), None
    inputs = fp8_fwd_quantize(q, k, v, seq_offsets, max_seq_len, fp8_quant_mode,
                              exact=fp8_accumulation != "fast")
    return fp8_fwd_kernel(inputs, q.dtype, seq_offsets, num_targets, max_seq_len, alpha,
                          scaling_seqlen, mask, fp8_quant_mode, config, fp8_accumulation), inputs


def fp8_forward_quantized_for_backward(inputs: Optional[FP8ForwardInputs],
                                       fp8_quant_mode: int) -> Dict[str, "FP8Quantized"]:
    """The operands of ``inputs`` (:func:`fp8_fwd_and_inputs`) that :func:`fp8_bwd` reuses
    (:func:`fp8_bwd_reused_operands`), by name; nothing else of the forward stays alive (the
    transposed v is not needed). Kept until the backward: 1 byte per element of each."""
    if inputs is None:
        return {}
    dqk, dv = inputs.q_q.values.shape[2], inputs.v_q.values.shape[2]
    named = {"q": inputs.q_q, "k": inputs.k_q, "v": inputs.v_q}
    return {name: named[name] for name in fp8_bwd_reused_operands(fp8_quant_mode, dqk, dv)}


def fp8_bwd_reused_operands(fp8_quant_mode: int, dqk: int, dv: int) -> Tuple[str, ...]:
    """Which of ``"q", "k", "v"`` the backward quantizes exactly as the forward did, so that
    :func:`fp8_bwd` may take them from :func:`fp8_fwd_and_inputs` instead of quantizing again:
    all three where the scale ignores the block size (modes 0, 3, 4, 5); in mode 2 those whose
    forward and backward blocks are equal (k and v at head dims <= 128: 128 tokens both ways;
    q's blocks are 128 forward, 64 backward); none in mode 1 (its backward also needs column
    scales)."""
    from torchrec_hstu.ops.fp8.quantize import FP8TileSizes

    if fp8_quant_mode == 1:
        return ()
    if fp8_quant_mode != 2:
        return ("q", "k", "v")
    tiles = FP8TileSizes.for_head_dim(max(dqk, dv))
    reused = ("q",) if tiles.fwd_block_m == tiles.bwd_block_m else ()
    return reused + (("k", "v") if tiles.fwd_block_n == tiles.bwd_block_n else ())


def fp8_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    mask: _MaskArgs,
    fp8_quant_mode: int,
    config: Optional[KernelConfig] = None,
    fp8_accumulation: str = DEFAULT_FP8_ACCUMULATION,
    tma: Optional[bool] = None,
    forward_quantized: Optional[Dict[str, "FP8Quantized"]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-quantize ``q, k, v, dout`` with the backward tiles (fused Triton quantizers) and run
    the FP8 backward. P and dS are scaled per tile, or per row where
    :func:`fp8_bwd_row_scales` (then ``config.dq`` must be set: dQ by the dQ kernel).
    ``tma``: read the key-parallel launch's per-tile operands through TMA descriptors
    (default: where :func:`fp8_bwd_tma_supported`, never in the interpreter; the interpreter
    can run the loads, not the dQ bulk reduction). Same numbers either way.
    ``forward_quantized``: the forward's quantized operands by name (``"q"``, ``"k"``, ``"v"``;
    same mode and accumulation, from :func:`fp8_forward_quantized_for_backward`), taken as
    they are instead of quantized again (the same values: fewer launches)."""
    from torchrec_hstu.ops.fp8.quantize import FP8TileSizes

    check_fp8_accumulation(fp8_accumulation)

    total, num_heads, dqk = q.shape
    dv_dim = v.shape[2]
    batch = seq_offsets.numel() - 1
    dq, dk, dv = gradient_outputs(q, k, v)
    if total == 0 or batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    row_scales = fp8_bwd_row_scales(dqk, dv_dim, fp8_accumulation)
    # The definition this call runs (the emulation's with the same tiles).
    tiles = FP8TileSizes.for_head_dim(max(dqk, dv_dim), row_scales)
    bm, bn, chunk = tiles.bwd_block_m, tiles.bwd_block_n, tiles.colwise_chunk
    mode = fp8_quant_mode
    quantize = _batch_quantizer(seq_offsets, max_seq_len, mode, chunk, fp8_accumulation != "fast")

    def quant(x: torch.Tensor, block: int):
        row = quantize(x, block)
        return row, (quantize(x, block, colwise=True) if mode == 1 else row)

    reused = forward_quantized or {}
    if not set(reused) <= set(fp8_bwd_reused_operands(mode, dqk, dv_dim)):
        raise ValueError(f"forward_quantized: mode {mode} at head dims {dqk}, {dv_dim} reuses only "
                         f"{fp8_bwd_reused_operands(mode, dqk, dv_dim)}; got {sorted(reused)}")
    q_r, q_c = (reused["q"],) * 2 if "q" in reused else quant(q, bm)
    do_r, do_c = quant(dout, bm)
    k_r, k_c = (reused["k"],) * 2 if "k" in reused else quant(k, bn)
    v_r = reused["v"] if "v" in reused else quantize(v, bn)
    qct, kct, doct = (_transposed_aligned(x.values, seq_offsets, max_seq_len)
                      for x in (q_c, k_c, do_c))
    q8, k8, v8, do8 = q_r.values, k_r.values, v_r.values, do_r.values
    block_dqk, block_dv = _fp8_block_dim(dqk), _fp8_block_dim(dv_dim)
    scale = 1.0 / scaling_seqlen
    if tma is None:
        tma = not interpret_mode() and fp8_bwd_tma_supported(q8, dqk, dv_dim, fp8_accumulation)
    elif tma and not fp8_bwd_tma_supported(q8, dqk, dv_dim, fp8_accumulation):
        raise ValueError(f"tma=True needs SM90+ and head dims in {{32, 64, 128}} (256 under "
                         f"fp8_accumulation='fast'); got {dqk}, {dv_dim}, {fp8_accumulation!r}")
    if tma:
        tensors = dict(Q=_rows_descriptor(q8, bm), DO=_rows_descriptor(do8, bm),
                       QCT=_columns_descriptor(qct, bm), DOCT=_columns_descriptor(doct, bm))
    else:
        tensors = dict(Q=q8, DO=do8, QCT=qct, DOCT=doct)
    tma_reduce = tma and not interpret_mode()

    fast = fp8_accumulation == "fast"
    common = dict(
        DQK=dqk, DV_DIM=dv_dim, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        QUANT_MODE=mode, MASK_MODE=mask.mode, HAS_TARGETS=mask.has_targets,
        INTERPRET=interpret_mode(), MAX_IMPRECISE=_max_imprecise(False, fp8_accumulation),
        MAX_IMPRECISE_S=_max_imprecise(True, fp8_accumulation),
        # Fast accumulation: tanh sigmoid, modes 2..5 accumulate dK / dV / dQ in place
        # (RESCALE), and at D <= 128 P / dS scales per row (fp8_bwd_row_scales: no exchange
        # of tile maxima across warps); all measured against the float64 bound.
        FAST_SILU=fast, RESCALE=fast, ROW_SCALES=row_scales,
    )

    def launch(cfg: KernelConfig, compute_dv: bool, compute_dkdq: bool, atomic_dq: bool,
               dq_acc: torch.Tensor) -> None:
        grid = (batch * num_heads, ceil_div(max_seq_len, bn))
        reduce_dq = tma_reduce and atomic_dq
        _fp8_bwd_kernel[grid](
            tensors["Q"], q_r.token_descale, k8, k_r.token_descale, v8, v_r.token_descale,
            tensors["DO"], do_r.token_descale, tensors["QCT"], q_c.token_descale, kct,
            k_c.token_descale, tensors["DOCT"], do_c.token_descale, dq_acc, dk, dv, seq_offsets,
            num_targets if num_targets is not None else seq_offsets,
            _rows_descriptor(dq_acc, bm) if reduce_dq else dq_acc,
            q8.stride(0), q8.stride(1), *_row_strides(q_r.token_descale),
            k8.stride(0), k8.stride(1), *_row_strides(k_r.token_descale),
            v8.stride(0), v8.stride(1), *_row_strides(v_r.token_descale),
            do8.stride(0), do8.stride(1), *_row_strides(do_r.token_descale),
            qct.stride(0), qct.stride(1), *_vec_strides(q_c.token_descale),
            kct.stride(0), kct.stride(1), *_vec_strides(k_c.token_descale),
            doct.stride(0), doct.stride(1), *_vec_strides(do_c.token_descale),
            dq_acc.stride(0), dq_acc.stride(1), dk.stride(0), dk.stride(1), dv.stride(0),
            dv.stride(1),
            alpha, alpha * scale, scale,
            mask.c, mask.w, mask.m, mask.sla_k1, mask.k2,
            num_heads,
            BLOCK_M=bm, BLOCK_N=bn, COMPUTE_DV=compute_dv, COMPUTE_DKDQ=compute_dkdq,
            T_ALIGNED=True, ATOMIC_DQ=atomic_dq, USE_TMA=tma, TMA_REDUCE=reduce_dq, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    # Row scales: dS scaled per query over bwd_dq_block_n keys, the dQ kernel's key tile.
    dq_bn = tiles.bwd_dq_block_n if tiles.bwd_row_scales else bn

    def launch_dq(cfg: KernelConfig) -> None:
        grid = (batch * num_heads, ceil_div(max_seq_len, bm))
        _fp8_bwd_dq_kernel[grid](
            q8, q_r.token_descale, k8, k_r.token_descale, v8, v_r.token_descale, do8,
            do_r.token_descale, kct, k_c.token_descale, dq, seq_offsets,
            num_targets if num_targets is not None else seq_offsets,
            q8.stride(0), q8.stride(1), *_row_strides(q_r.token_descale),
            k8.stride(0), k8.stride(1), *_row_strides(k_r.token_descale),
            v8.stride(0), v8.stride(1), *_row_strides(v_r.token_descale),
            do8.stride(0), do8.stride(1), *_row_strides(do_r.token_descale),
            kct.stride(0), kct.stride(1), *_vec_strides(k_c.token_descale),
            dq.stride(0), dq.stride(1),
            alpha, alpha * scale,
            mask.c, mask.w, mask.m, mask.sla_k1, mask.k2,
            num_heads,
            BLOCK_M=bm, BLOCK_N=dq_bn, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def run(cfg: KernelConfig) -> None:
        run_backward_layout(cfg, launch, launch_dq, dq, alpha * scale)

    if config is None:
        key = ("fp8_bwd", mode, fp8_accumulation, q.dtype, block_dqk, block_dv, mask.mode,
               _seq_class(max_seq_len))
        config = choose_config(key, functools.partial(fp8_bwd_candidates, dqk, dv_dim, fp8_accumulation),
                               max_seq_len, run)
    # Checked after choose_config: a config pinned with set_config must fit row scales too.
    if row_scales and config.dq is None:
        raise ValueError("with row scales (fp8_accumulation='fast', head dims <= 128) dS is scaled "
                         "per key for dK and per query for dQ, so dQ needs the dQ kernel: "
                         f"config.dq must be set; got {config}")
    run(config)
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# torch.library custom ops + autograd
# --------------------------------------------------------------------------------------


def _fp8_fwd_eager(q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options, fp8_accumulation):
    """FP8 forward (quantization included): ``(out [L, H, Dv] in the dtype of q, the quantized
    operands the backward reuses)`` (:func:`fp8_forward_quantized_for_backward`)."""
    mask = mask_args_of(options, num_targets is not None)
    out, inputs = fp8_fwd_and_inputs(q, k, v, seq_offsets, num_targets, max_seq_len, alpha,
                                     options.resolve_scaling_seqlen(max_seq_len), mask,
                                     options.fp8_quant_mode, fp8_accumulation=fp8_accumulation)
    return out, fp8_forward_quantized_for_backward(inputs, options.fp8_quant_mode)


def _fp8_bwd_eager(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options, fp8_accumulation,
                   forward_quantized):
    """FP8 backward: ``(dq, dk, dv)`` in the dtype of ``q``, reusing ``forward_quantized`` (the
    forward's quantized operands by name; None: quantize every operand again)."""
    mask = mask_args_of(options, num_targets is not None)
    return fp8_bwd(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha,
                   options.resolve_scaling_seqlen(max_seq_len), mask, options.fp8_quant_mode,
                   fp8_accumulation=fp8_accumulation, forward_quantized=forward_quantized)


def _fp8_fwd_impl(q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options, fp8_accumulation):
    """The forward op: :func:`_fp8_fwd_eager`'s output alone (the op's autograd saves only the
    high-precision inputs)."""
    return _fp8_fwd_eager(q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options, fp8_accumulation)[0]


def _fp8_bwd_impl(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options, fp8_accumulation):
    """The backward op: :func:`_fp8_bwd_eager` quantizing every operand again."""
    return _fp8_bwd_eager(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options,
                          fp8_accumulation, None)


def _fp8_bwd_fake(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options, fp8_accumulation):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


triton_hstu_fp8_attention_fwd = define_attention_op(
    "torchrec_hstu::triton_hstu_fp8_attention_fwd", ATTENTION_TENSORS, _fp8_fwd_impl, attention_output_fake,
    trailing=("str fp8_accumulation",), module=__name__,
)
triton_hstu_fp8_attention_bwd = define_attention_op(
    "torchrec_hstu::triton_hstu_fp8_attention_bwd", ("Tensor dout",) + ATTENTION_TENSORS, _fp8_bwd_impl,
    _fp8_bwd_fake, trailing=("str fp8_accumulation",), returns=GRADIENTS, module=__name__,
)
#: Differentiable forward: the ops' autograd, without the dispatcher in plain eager calls.
triton_hstu_fp8_attention_differentiable = register_attention_autograd(
    triton_hstu_fp8_attention_fwd, triton_hstu_fp8_attention_bwd, _fp8_fwd_eager, _fp8_bwd_eager
)


def triton_fp8_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
    fp8_accumulation: str = DEFAULT_FP8_ACCUMULATION,
) -> torch.Tensor:
    """FP8 HSTU attention by the Triton kernels (differentiable), ``options.fp8_quant_mode`` 0..5.

    Inputs are quantized to float8_e4m3fn with the mode's quantizer, the products run on fp8
    tensor cores, ``P`` and ``dS`` are re-quantized per tile; the output and gradients have the
    input dtype (notes decisions 5, 6). The mask options are those of
    :func:`~torchrec_hstu.ops.triton.hstu_attention.triton_hstu_attention`.

    Args:
        q: ``[L, H, Dqk]`` CUDA bf16/fp16/fp32.
        k: ``[L, H, Dqk]``.
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]`` int32/int64.
        max_seq_len: ``N`` >= every sequence length.
        alpha: scale of ``q k^T``.
        options: :class:`AttentionOptions` with ``fp8_quant_mode`` in 0..5.
        num_targets: optional ``[B]``.
        fp8_accumulation: how the fp8 ``tl.dot``s accumulate (:data:`FP8_ACCUMULATIONS`):
            ``"fast"`` (default: Hopper's native fp8 accumulation everywhere and, forward, the
            tanh-form silu; error vs float64 within 1.1x the emulation's), ``"mixed"`` (exact
            products only for ``q k^T`` and ``dO v^T``) or ``"precise"`` (every product exact,
            exact silu: equal to the PyTorch emulation up to fp32 summation order).
            ``benchmarks/fp8_fwd_speed.py`` measures speed and error of each.

    Returns:
        ``[L, H, Dv]`` in the dtype of ``q``.

    Raises:
        ValueError: ``fp8_quant_mode`` off, head dims < 16, or an unknown ``fp8_accumulation``.

    Example::

        >>> q, k, v = (torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> opts = AttentionOptions(fp8_quant_mode=2)
        >>> triton_fp8_hstu_attention(q, k, v, torch.tensor([0, 100, 300], device="cuda"), 200,
        ...                           0.125, opts).shape
        torch.Size([300, 2, 64])
    """
    if not options.use_fp8:
        raise ValueError(
            "triton_fp8_hstu_attention needs options.fp8_quant_mode in 0..5; got -1 "
            "(use triton_hstu_attention for bf16/fp16)"
        )
    if q.shape[2] < 16 or v.shape[2] < 16:
        raise ValueError(
            f"TRITON FP8 needs head dims >= 16; got Dqk={q.shape[2]}, Dv={v.shape[2]}"
        )
    check_fp8_accumulation(fp8_accumulation)
    check_triton_inputs(q, k, v)
    return triton_hstu_fp8_attention_differentiable(
        q, k, v, seq_offsets, num_targets, max_seq_len, float(alpha), options, fp8_accumulation
    )
