"""Triton jagged HSTU attention (bf16 / fp16 / fp32), forward and backward.

Symbols: ``B`` batch, ``L`` total tokens, ``H`` heads, ``Dqk`` q/k head dim, ``Dv`` v head dim,
``N`` the batch ``max_seq_len``. Per sequence and head::

    O = (silu(alpha * Q K^T) / scaling_seqlen * mask) @ V

Forward: one program per (query block, sequence, head); the grid runs the last query block of
every sequence first (causal work grows with the block index, so the longest pieces of work
start first and the short ones fill the tail). Key tiles the mask rules out are skipped
(:func:`~torchrec_hstu.ops.triton._common.fwd_tile_ranges`); tiles the rules prove fully valid
run without mask arithmetic or bounds checks.

Backward: one program per (key block, sequence, head) accumulates ``dK`` and ``dV`` in
registers over the query tiles that can see the block and adds its share of ``dQ`` with fp32
atomics. HSTU has no softmax, so no row statistics are saved: only ``q, k, v`` (and the output
gradient) are read again.

The ops (``torchrec_hstu::triton_hstu_attention_fwd`` / ``_bwd``) come from the shared
factory :func:`~torchrec_hstu.ops.custom_ops.define_attention_op`, with fake implementations
and autograd, so ``torch.compile`` and ``torch.export`` see one opaque op per direction; plain
eager calls run the same implementations without the dispatcher
(:func:`~torchrec_hstu.ops.custom_ops.register_attention_autograd`).
"""

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from torchrec_hstu.ops.common import AttentionOptions, is_tracing
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
    mask_mode,
    next_power_of_2,
    seq_num_targets,
    seq_span,
    silu_and_sigmoid,
    silu_scaled,
    tile_segment,
    valid_mask,
)

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    acc, q, k_ptrs, v_ptrs, j0, offs_m, offs_n, offs_dqk, offs_dv,
    stride_kn, stride_vn, n, T, c, W, M, sla_k1, K2, half_alpha, half_alpha_scale,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_MODE: tl.constexpr, MASKED: tl.constexpr, FAST_SILU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    cols = j0 + offs_n
    if MASKED:
        k = tl.load(k_ptrs + j0 * stride_kn, mask=(cols[:, None] < n) & (offs_dqk[None, :] < DQK),
                    other=0.0)
    elif BLOCK_DQK != DQK:
        k = tl.load(k_ptrs + j0 * stride_kn, mask=offs_dqk[None, :] < DQK, other=0.0)
    else:
        k = tl.load(k_ptrs + j0 * stride_kn)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    p = silu_scaled(s, half_alpha, half_alpha_scale, FAST_SILU)
    if MASKED:
        valid = valid_mask(offs_m[:, None], cols[None, :], n, T, c, W, M, sla_k1, K2, MASK_MODE)
        p = tl.where(valid, p, 0.0)
        v = tl.load(v_ptrs + j0 * stride_vn, mask=(cols[:, None] < n) & (offs_dv[None, :] < DV),
                    other=0.0)
    elif BLOCK_DV != DV:
        v = tl.load(v_ptrs + j0 * stride_vn, mask=offs_dv[None, :] < DV, other=0.0)
    else:
        v = tl.load(v_ptrs + j0 * stride_vn)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _fwd_query_block(
    q, K, V, start, h, stride_km, stride_kh, stride_vm, stride_vh, m0, n, T, c, W, M, sla_k1, K2,
    half_alpha, half_alpha_scale,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr,
    FAST_SILU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_DV]`` fp32 output of the loaded query rows ``q`` at positions
    ``m0 .. m0 + BLOCK_M`` of the sequence (``start``, ``n``, ``T``), head ``h``: every key tile
    the mask can reach, interior tiles unmasked. Shared by the full and the delta kernel."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = K + start * stride_km + h * stride_kh + offs_n[:, None] * stride_km + offs_dqk[None, :]
    v_ptrs = V + start * stride_vm + h * stride_vh + offs_n[:, None] * stride_vm + offs_dv[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    ta0, ta1, tb0, ti0, ti1, tb1 = fwd_tile_ranges(
        m0, n, T, c, W, M, sla_k1, K2, MASK_MODE, BLOCK_M, BLOCK_N)
    for SEGMENT in tl.static_range(4):
        lo, hi = tile_segment(SEGMENT, ta0, ta1, tb0, ti0, ti1, tb1)
        for j0 in range(lo, hi, BLOCK_N):
            acc = _fwd_tile(acc, q, k_ptrs, v_ptrs, j0, offs_m, offs_n, offs_dqk, offs_dv,
                            stride_km, stride_vm, n, T, c, W, M, sla_k1, K2, half_alpha,
                            half_alpha_scale, DQK, DV, BLOCK_DQK, BLOCK_DV, MASK_MODE,
                            SEGMENT != 2, FAST_SILU, INPUT_PRECISION)
    return acc


@triton.jit
def _hstu_fwd_kernel(
    Q, K, V, Out, seq_offsets, num_targets,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
    half_alpha, half_alpha_scale,
    c, W, M, sla_k1, K2,
    H,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr, HAS_TARGETS: tl.constexpr, FAST_SILU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    # Last query block first: under a causal mask it carries the most work.
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
    q_ptrs = Q + start * stride_qm + h * stride_qh + offs_m[:, None] * stride_qm + offs_dqk[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < n) & (offs_dqk[None, :] < DQK), other=0.0)
    acc = _fwd_query_block(q, K, V, start, h, stride_km, stride_kh, stride_vm, stride_vh, m0, n,
                           T, c, W, M, sla_k1, K2, half_alpha, half_alpha_scale, DQK, DV,
                           BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_MODE, FAST_SILU,
                           INPUT_PRECISION)
    o_ptrs = Out + start * stride_om + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < n) & (offs_dv[None, :] < DV))


# --------------------------------------------------------------------------------------
# Backward kernel (dK, dV per key block; dQ by fp32 atomics)
# --------------------------------------------------------------------------------------


@triton.jit
def _bwd_tile(
    dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, m0, offs_m, offs_n, offs_dqk, offs_dv,
    stride_qm, stride_dom, stride_dqm, n, T, c, W, M, sla_k1, K2, half_alpha,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_MODE: tl.constexpr, MASKED: tl.constexpr, FAST_SILU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, COMPUTE_DV: tl.constexpr, COMPUTE_DK: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    rows = m0 + offs_m
    row_in = rows < n
    if MASKED or BLOCK_DQK != DQK:
        q = tl.load(q_ptrs + m0 * stride_qm, mask=row_in[:, None] & (offs_dqk[None, :] < DQK),
                    other=0.0)
    else:
        q = tl.load(q_ptrs + m0 * stride_qm)
    if MASKED or BLOCK_DV != DV:
        do = tl.load(do_ptrs + m0 * stride_dom, mask=row_in[:, None] & (offs_dv[None, :] < DV),
                     other=0.0)
    else:
        do = tl.load(do_ptrs + m0 * stride_dom)
    # Transposed scores: rows of sT are keys, columns are queries.
    sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)
    pT, sigT = silu_and_sigmoid(sT, half_alpha, FAST_SILU)
    if MASKED:
        valid = valid_mask(rows[None, :], offs_n[:, None], n, T, c, W, M, sla_k1, K2, MASK_MODE)
    if COMPUTE_DK:
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        # d silu(x) / dx = sig + silu * (1 - sig); alpha / scaling_seqlen is applied at the end.
        dsT = dpT * (sigT + pT * (1.0 - sigT))
        if MASKED:
            dsT = tl.where(valid, dsT, 0.0)
        ds16T = dsT.to(q.dtype)
        dk = tl.dot(ds16T, q, dk, input_precision=INPUT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds16T), k, input_precision=INPUT_PRECISION)
            tl.atomic_add(dq_ptrs + m0 * stride_dqm, dq,
                          mask=row_in[:, None] & (offs_dqk[None, :] < DQK), sem="relaxed")
    if COMPUTE_DV:
        if MASKED:
            pT = tl.where(valid, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _hstu_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, seq_offsets, num_targets,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
    stride_dom, stride_doh, stride_dqm, stride_dqh, stride_dkm, stride_dkh,
    stride_dvm, stride_dvh,
    half_alpha, dk_scale, dv_scale,
    c, W, M, sla_k1, K2,
    H,
    DQK: tl.constexpr, DV_DIM: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr, HAS_TARGETS: tl.constexpr, FAST_SILU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, COMPUTE_DV: tl.constexpr, COMPUTE_DK: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    # First key block first: under a causal mask it is seen by the most queries.
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
    k = tl.load(K + start * stride_km + h * stride_kh + offs_n[:, None] * stride_km
                + offs_dqk[None, :], mask=col_in[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    v = tl.load(V + start * stride_vm + h * stride_vh + offs_n[:, None] * stride_vm
                + offs_dv[None, :], mask=col_in[:, None] & (offs_dv[None, :] < DV_DIM), other=0.0)
    q_ptrs = Q + start * stride_qm + h * stride_qh + offs_m[:, None] * stride_qm + offs_dqk[None, :]
    do_ptrs = DO + start * stride_dom + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :]
    dq_ptrs = DQ + start * stride_dqm + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_dqk[None, :]
    # A program that computes only one of dV and dK keeps a 1 x 1 dummy for the other.
    if COMPUTE_DK:
        dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    else:
        dk = tl.zeros([1, 1], dtype=tl.float32)
    if COMPUTE_DV:
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    else:
        dv = tl.zeros([1, 1], dtype=tl.float32)
    ta0, ta1, tb0, ti0, ti1, tb1 = bwd_tile_ranges(
        n0, n, T, c, W, M, sla_k1, K2, MASK_MODE, BLOCK_M, BLOCK_N)
    # The column mask (keys >= n) is part of valid_mask; interior tiles only exist for full
    # key blocks' rows after them, where every key is < n.
    for SEGMENT in tl.static_range(4):
        lo, hi = tile_segment(SEGMENT, ta0, ta1, tb0, ti0, ti1, tb1)
        for m0 in range(lo, hi, BLOCK_M):
            dk, dv = _bwd_tile(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, m0, offs_m, offs_n,
                               offs_dqk, offs_dv, stride_qm, stride_dom, stride_dqm, n, T, c, W,
                               M, sla_k1, K2, half_alpha, DQK, DV_DIM, BLOCK_DQK, BLOCK_DV,
                               MASK_MODE, SEGMENT != 2, FAST_SILU, INPUT_PRECISION, COMPUTE_DV,
                               COMPUTE_DK, ATOMIC_DQ)
    dk_ptrs = DK + start * stride_dkm + h * stride_dkh + offs_n[:, None] * stride_dkm + offs_dqk[None, :]
    dv_ptrs = DV + start * stride_dvm + h * stride_dvh + offs_n[:, None] * stride_dvm + offs_dv[None, :]
    if COMPUTE_DK:
        tl.store(dk_ptrs, (dk * dk_scale).to(DK.dtype.element_ty),
                 mask=col_in[:, None] & (offs_dqk[None, :] < DQK))
    if COMPUTE_DV:
        tl.store(dv_ptrs, (dv * dv_scale).to(DV.dtype.element_ty),
                 mask=col_in[:, None] & (offs_dv[None, :] < DV_DIM))


@triton.jit
def _dq_tile(
    acc, q, do, k_ptrs, v_ptrs, j0, offs_m, offs_n, offs_dqk, offs_dv,
    stride_kn, stride_vn, n, T, c, W, M, sla_k1, K2, half_alpha,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_MODE: tl.constexpr, MASKED: tl.constexpr, FAST_SILU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    cols = j0 + offs_n
    if MASKED or BLOCK_DQK != DQK:
        k = tl.load(k_ptrs + j0 * stride_kn, mask=(cols[:, None] < n) & (offs_dqk[None, :] < DQK),
                    other=0.0)
    else:
        k = tl.load(k_ptrs + j0 * stride_kn)
    if MASKED or BLOCK_DV != DV:
        v = tl.load(v_ptrs + j0 * stride_vn, mask=(cols[:, None] < n) & (offs_dv[None, :] < DV),
                    other=0.0)
    else:
        v = tl.load(v_ptrs + j0 * stride_vn)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    p, sig = silu_and_sigmoid(s, half_alpha, FAST_SILU)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = dp * (sig + p * (1.0 - sig))
    if MASKED:
        valid = valid_mask(offs_m[:, None], cols[None, :], n, T, c, W, M, sla_k1, K2, MASK_MODE)
        ds = tl.where(valid, ds, 0.0)
    return tl.dot(ds.to(k.dtype), k, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _hstu_bwd_dq_kernel(
    Q, K, V, DO, DQ, seq_offsets, num_targets,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
    stride_dom, stride_doh, stride_dqm, stride_dqh,
    half_alpha, dq_scale,
    c, W, M, sla_k1, K2,
    H,
    DQK: tl.constexpr, DV_DIM: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr, HAS_TARGETS: tl.constexpr, FAST_SILU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``dQ`` of one query block: the forward's walk over key tiles, one accumulator, no atomics
    (a key-parallel launch computes ``dK``/``dV``)."""
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
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_in = offs_m < n
    q = tl.load(Q + start * stride_qm + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_dqk[None, :], mask=row_in[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    do = tl.load(DO + start * stride_dom + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :], mask=row_in[:, None] & (offs_dv[None, :] < DV_DIM), other=0.0)
    k_ptrs = K + start * stride_km + h * stride_kh + offs_n[:, None] * stride_km + offs_dqk[None, :]
    v_ptrs = V + start * stride_vm + h * stride_vh + offs_n[:, None] * stride_vm + offs_dv[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    ta0, ta1, tb0, ti0, ti1, tb1 = fwd_tile_ranges(
        m0, n, T, c, W, M, sla_k1, K2, MASK_MODE, BLOCK_M, BLOCK_N)
    for SEGMENT in tl.static_range(4):
        lo, hi = tile_segment(SEGMENT, ta0, ta1, tb0, ti0, ti1, tb1)
        for j0 in range(lo, hi, BLOCK_N):
            acc = _dq_tile(acc, q, do, k_ptrs, v_ptrs, j0, offs_m, offs_n, offs_dqk, offs_dv,
                           stride_km, stride_vm, n, T, c, W, M, sla_k1, K2, half_alpha, DQK,
                           DV_DIM, BLOCK_DQK, BLOCK_DV, MASK_MODE, SEGMENT != 2, FAST_SILU,
                           INPUT_PRECISION)
    dq_ptrs = DQ + start * stride_dqm + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_dqk[None, :]
    tl.store(dq_ptrs, (acc * dq_scale).to(DQ.dtype.element_ty),
             mask=row_in[:, None] & (offs_dqk[None, :] < DQK))


# --------------------------------------------------------------------------------------
# Launch configuration: heuristic defaults, autotuned per shape class on first use
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel launch.

    ``block_m`` counts query rows, ``block_n`` key rows (forward: a program owns ``block_m``
    queries and walks key tiles of ``block_n``; backward: a program owns ``block_n`` keys and
    walks query tiles of ``block_m``).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    #: Backward only: one launch for dV and one for dK (with dQ, unless ``dq``), each holding
    #: one accumulator (recomputes q k^T once more; pays off when two [block_n, D] fp32
    #: accumulators spill).
    split_bwd: bool = False
    #: Backward only (bf16/fp16/fp32): dQ by its own query-parallel launch with this config, no
    #: atomics (recomputes q k^T and dO v^T once more; pays off at D=256, where the atomics'
    #: traffic and a third [block_m, D] product per tile dominate). ``None``: the key-parallel
    #: launch adds its share of dQ with fp32 atomics.
    dq: Optional["KernelConfig"] = None


#: Sequences at least this long (batch ``max_seq_len``) trigger autotuning of their shape class.
AUTOTUNE_MIN_SEQ_LEN = 512
_AUTOTUNE_ENV = "TORCHREC_HSTU_TRITON_AUTOTUNE"
_config_cache: Dict[Tuple, KernelConfig] = {}


def _block_dim(d: int) -> int:
    return max(16, next_power_of_2(d))


def fwd_candidates(block_dqk: int, block_dv: int, dtype: torch.dtype) -> List[KernelConfig]:
    """Forward configs tried by the autotuner, the heuristic default first."""
    if interpret_mode():
        return [KernelConfig(16, 16, 4, 1)]
    wide = max(block_dqk, block_dv)
    if dtype == torch.float32:
        return [KernelConfig(64, 32, 4, 2), KernelConfig(32, 32, 4, 2)]
    # Pruned to configs that won or came within 5% on H100 (2026-11-25 runs, N = 1024..4096).
    # H200 (2026-12-03, B=16, N = 4096 / 8192, pinned, benchmarks/tools/fwd_configs.py):
    # D=128 128/32/8/4 0.545 / 2.246 ms, the fastest, beside 128/64/8/3 0.561 / 2.275;
    # D=256 128/32/8/3 1.082 / 4.603 vs 128/64/8/2 1.202 / 4.610; everything else slower.
    if wide <= 128:
        return [KernelConfig(128, 64, 8, 3), KernelConfig(128, 32, 8, 4),
                KernelConfig(128, 128, 8, 3), KernelConfig(64, 64, 4, 3)]
    return [KernelConfig(128, 64, 8, 2), KernelConfig(128, 32, 8, 3)]


def bwd_candidates(block_dqk: int, block_dv: int, dtype: torch.dtype) -> List[KernelConfig]:
    """Backward configs tried by the autotuner, the heuristic default first."""
    if interpret_mode():
        return [KernelConfig(16, 16, 4, 1)]
    wide = max(block_dqk, block_dv)
    if dtype == torch.float32:
        return [KernelConfig(32, 32, 4, 2), KernelConfig(16, 32, 4, 2)]
    if wide <= 128:
        # ptxas (sm90, static): 32/128/8/3 fused 245 registers, dQ by mma.sync (32-row tiles
        # are below wgmma's 64); dK+dV without dQ 64/128/8/2 255, the dQ kernel 128/64/8/2 230.
        # Timed (2026-12-02, H100 and H200, N = 4096 / 8192, full and jagged): the dQ-kernel
        # layouts won every shape (32/128/8/3 + 128/64/8/3 first, 64/128/8/2 + 128/64/8/2
        # second); 64/128/8/2 fused and split never came within 20% and were dropped.
        return [KernelConfig(32, 128, 8, 3),
                KernelConfig(32, 128, 8, 3, dq=KernelConfig(128, 64, 8, 3)),
                KernelConfig(64, 128, 8, 2, dq=KernelConfig(128, 64, 8, 2))]
    # D = 256 (H100, 2026-11-25): split 32/64/4/2 8.3 ms vs fused 16.6 ms at N=2048;
    # 64/64/8/2 and 64/128/8/2 do not fit shared memory. ptxas (sm90, static): the (dK, dQ)
    # launch spills 844 B (32/64/4/2); without dQ, dK 32/64/8/2 takes 227 registers and dV
    # 192, no spills; the dQ kernel 128/32/8/2 238, no spills. Timed (2026-12-02, H100,
    # N = 2048 / 4096 / 8192): 32/128/8/2 split + dQ 128/32/8/2 won every shape, 1.7-2.1x the
    # best atomic layout; 64/64/8/1 split (the slowest) and a 64/64/8/2 dQ kernel were dropped.
    return [KernelConfig(32, 64, 4, 2, split_bwd=True), KernelConfig(32, 64, 8, 2, split_bwd=True),
            KernelConfig(32, 64, 8, 2, split_bwd=True, dq=KernelConfig(128, 32, 8, 2)),
            KernelConfig(32, 128, 8, 2, split_bwd=True, dq=KernelConfig(128, 32, 8, 2))]


def _seq_class(max_seq_len: int) -> int:
    return max(AUTOTUNE_MIN_SEQ_LEN, next_power_of_2(max(1, max_seq_len)))


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (launches are recorded)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _autotune_enabled(max_seq_len: int) -> bool:
    if interpret_mode() or _capturing():
        return False
    if os.environ.get(_AUTOTUNE_ENV, "1") == "0":
        return False
    return max_seq_len >= AUTOTUNE_MIN_SEQ_LEN


_CONFIG_ERRORS = (triton.runtime.errors.OutOfResources, triton.CompilationError)


def _first_that_fits(key: Tuple, candidates: List[KernelConfig], run) -> KernelConfig:
    """The first candidate that compiles and fits this GPU's shared memory and registers (the
    candidates are ordered for Hopper; a GPU with less shared memory, e.g. SM89's 99 KB, skips
    the ones that do not fit), found by launching each once, then cached per shape class. The
    last candidate is returned untried, so its own error surfaces if none fits. Not tried under
    the interpreter or while a CUDA graph is being captured (a trial launch would be captured
    too): the first candidate then."""
    untuned_key = key + ("untuned",)
    cached = _config_cache.get(untuned_key)
    if cached is not None:
        return cached
    if interpret_mode() or _capturing():
        return candidates[0]
    for config in candidates[:-1]:
        try:
            run(config)
        except _CONFIG_ERRORS as err:
            logger.debug("config %s does not fit: %s", config, err)
            continue
        _config_cache[untuned_key] = config
        return config
    return candidates[-1]


def choose_config(key: Tuple,
                  candidates: Union[List[KernelConfig], Callable[[], List[KernelConfig]]],
                  max_seq_len: int, run) -> KernelConfig:
    """Pick a config for shape class ``key``: cached, else autotuned (long sequences) or the
    first candidate that fits (:func:`_first_that_fits`). ``run(config)`` launches the kernel
    once with ``config`` (it may be called more than once: autotuning and the fit check do).
    ``candidates`` may be a function that lists them: called only on a cache miss (the
    launchers pass one, so a cached call builds no list)."""
    cached = _config_cache.get(key)
    if cached is not None:
        return cached
    if callable(candidates):
        candidates = candidates()
    if len(candidates) == 1:
        return candidates[0]
    if not _autotune_enabled(max_seq_len):
        return _first_that_fits(key, candidates, run)
    timings = []
    for config in candidates:
        try:
            ms = triton.testing.do_bench(lambda config=config: run(config), warmup=5, rep=20,
                                         return_mode="median")
        except _CONFIG_ERRORS as err:
            logger.debug("config %s does not fit: %s", config, err)
            continue
        timings.append((ms, config))
    if not timings:
        raise RuntimeError(f"no Triton HSTU config compiled for shape class {key}")
    best = min(timings, key=lambda t: t[0])[1]
    logger.info("autotuned %s -> %s (%s)", key, best,
                ", ".join(f"{c}: {ms:.3f} ms" for ms, c in timings))
    _config_cache[key] = best
    return best


def set_config(key: Tuple, config: KernelConfig) -> None:
    """Pin the config of a shape class (benchmarks use it to compare variants)."""
    _config_cache[key] = config


def clear_config_cache() -> None:
    _config_cache.clear()


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MaskArgs:
    mode: int
    has_targets: bool
    c: int
    w: int
    m: int
    sla_k1: int
    k2: int


@functools.lru_cache(maxsize=1024)
def mask_args_of(options: AttentionOptions, has_targets: bool) -> _MaskArgs:
    """The kernels' mask arguments of ``options`` (cached: a model has a few option sets, and
    this runs on every eager forward and backward)."""
    mode = mask_mode(options.causal, options.use_sla, has_targets, options.contextual_seq_len,
                     options.max_attn_len)
    return _MaskArgs(
        mode=mode,
        has_targets=has_targets,
        c=options.contextual_seq_len,
        w=options.max_attn_len,
        m=options.min_full_attn_seq_len if options.max_attn_len > 0 else 0,
        sla_k1=options.sla_k1,
        k2=max(options.sla_k2, options.contextual_seq_len),
    )


def _fast_silu(dtype: torch.dtype) -> bool:
    # tanh.approx.f32 is accurate to ~2^-11: below bf16/fp16 rounding, not below fp32's.
    return dtype != torch.float32 and not interpret_mode()


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products (no silent tf32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


#: ``launch(config, compute_dv, compute_dk, atomic_dq, dq_buffer)`` of a key-parallel backward.
KeyParallelLaunch = Callable[[KernelConfig, bool, bool, bool, torch.Tensor], None]


def gradient_outputs(q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialized contiguous ``(dq, dk, dv)`` shaped and typed like ``q, k, v``; every backward
    layout writes them whole (:func:`run_backward_layout`)."""
    contiguous = torch.contiguous_format
    return (torch.empty_like(q, memory_format=contiguous), torch.empty_like(k, memory_format=contiguous),
            torch.empty_like(v, memory_format=contiguous))


def run_backward_layout(cfg: KernelConfig, launch: KeyParallelLaunch,
                        launch_dq: Callable[[KernelConfig], None], dq: torch.Tensor,
                        dq_scale: float) -> None:
    """One whole backward pass in ``cfg``'s launch layout, writing all of ``dq`` (and, through
    ``launch``, ``dk`` and ``dv``): autotuning runs it more than once.

    * ``cfg.dq`` set: key-parallel launch(es) for dK and dV (one, or two with ``split_bwd``),
      then ``launch_dq(cfg.dq)``, the query-parallel dQ kernel, which writes ``dq`` scaled.
    * otherwise: the key-parallel launch(es) also add dQ shares with fp32 atomics into a zeroed
      buffer, scaled by ``dq_scale`` and cast into ``dq`` at the end.
    """
    if cfg.dq is not None:
        if cfg.split_bwd:
            launch(cfg, True, False, False, dq)
            launch(cfg, False, True, False, dq)
        else:
            launch(cfg, True, True, False, dq)
        launch_dq(cfg.dq)
        return
    dq_acc = torch.zeros(dq.shape, dtype=torch.float32, device=dq.device)
    if cfg.split_bwd:
        launch(cfg, True, False, False, dq_acc)
        launch(cfg, False, True, True, dq_acc)
    else:
        launch(cfg, True, True, True, dq_acc)
    torch.mul(dq_acc, dq_scale, out=dq_acc)
    dq.copy_(dq_acc)


def hstu_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    mask: _MaskArgs,
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """Launch the forward kernel; returns ``out: [L, H, Dv]``."""
    total, num_heads, dqk = q.shape
    dv = v.shape[2]
    out = torch.empty((total, num_heads, dv), dtype=q.dtype, device=q.device)
    batch = seq_offsets.numel() - 1
    if total == 0 or batch == 0:
        return out.zero_()
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    block_dqk, block_dv = _block_dim(dqk), _block_dim(dv)
    scale = 1.0 / scaling_seqlen

    def run(cfg: KernelConfig) -> None:
        grid = (batch * num_heads, ceil_div(max_seq_len, cfg.block_m))
        _hstu_fwd_kernel[grid](
            q, k, v, out, seq_offsets, num_targets if num_targets is not None else seq_offsets,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            0.5 * alpha, 0.5 * alpha * scale,
            mask.c, mask.w, mask.m, mask.sla_k1, mask.k2,
            num_heads,
            DQK=dqk, DV=dv, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            MASK_MODE=mask.mode, HAS_TARGETS=mask.has_targets, FAST_SILU=_fast_silu(q.dtype),
            INPUT_PRECISION=_input_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if config is None:
        key = ("fwd", q.dtype, block_dqk, block_dv, mask.mode, _seq_class(max_seq_len))
        config = choose_config(key, functools.partial(fwd_candidates, block_dqk, block_dv, q.dtype),
                               max_seq_len, run)
    run(config)
    return out


def hstu_bwd(
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
    config: Optional[KernelConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; returns ``(dq [L, H, Dqk], dk [L, H, Dqk], dv [L, H, Dv])``."""
    total, num_heads, dqk = q.shape
    dv_dim = v.shape[2]
    batch = seq_offsets.numel() - 1
    dq, dk, dv = gradient_outputs(q, k, v)
    if total == 0 or batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    dout = _last_dim_contiguous(dout)
    block_dqk, block_dv = _block_dim(dqk), _block_dim(dv_dim)
    scale = 1.0 / scaling_seqlen

    def launch(cfg: KernelConfig, compute_dv: bool, compute_dk: bool, atomic_dq: bool,
               dq_acc: torch.Tensor) -> None:
        grid = (batch * num_heads, ceil_div(max_seq_len, cfg.block_n))
        _hstu_bwd_kernel[grid](
            q, k, v, dout, dq_acc, dk, dv, seq_offsets,
            num_targets if num_targets is not None else seq_offsets,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq_acc.stride(0), dq_acc.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            0.5 * alpha, alpha * scale, scale,
            mask.c, mask.w, mask.m, mask.sla_k1, mask.k2,
            num_heads,
            DQK=dqk, DV_DIM=dv_dim, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            MASK_MODE=mask.mode, HAS_TARGETS=mask.has_targets, FAST_SILU=_fast_silu(q.dtype),
            INPUT_PRECISION=_input_precision(q.dtype),
            COMPUTE_DV=compute_dv, COMPUTE_DK=compute_dk, ATOMIC_DQ=atomic_dq,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def launch_dq(cfg: KernelConfig) -> None:
        grid = (batch * num_heads, ceil_div(max_seq_len, cfg.block_m))
        _hstu_bwd_dq_kernel[grid](
            q, k, v, dout, dq, seq_offsets,
            num_targets if num_targets is not None else seq_offsets,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            0.5 * alpha, alpha * scale,
            mask.c, mask.w, mask.m, mask.sla_k1, mask.k2,
            num_heads,
            DQK=dqk, DV_DIM=dv_dim, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            MASK_MODE=mask.mode, HAS_TARGETS=mask.has_targets, FAST_SILU=_fast_silu(q.dtype),
            INPUT_PRECISION=_input_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def run(cfg: KernelConfig) -> None:
        run_backward_layout(cfg, launch, launch_dq, dq, alpha * scale)

    if config is None:
        key = ("bwd", q.dtype, block_dqk, block_dv, mask.mode, _seq_class(max_seq_len))
        config = choose_config(key, functools.partial(bwd_candidates, block_dqk, block_dv, q.dtype),
                               max_seq_len, run)
    run(config)
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# torch.library custom ops + autograd
# --------------------------------------------------------------------------------------


GRADIENTS = "(Tensor, Tensor, Tensor)"


def _fwd_impl(q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options):
    mask = mask_args_of(options, num_targets is not None)
    return hstu_fwd(q, k, v, seq_offsets, num_targets, max_seq_len, alpha,
                    options.resolve_scaling_seqlen(max_seq_len), mask)


def _bwd_impl(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options):
    mask = mask_args_of(options, num_targets is not None)
    return hstu_bwd(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha,
                    options.resolve_scaling_seqlen(max_seq_len), mask)


def _bwd_fake(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


#: Forward op: ``out [L, H, Dv]`` (see :func:`triton_hstu_attention`).
triton_hstu_attention_fwd = define_attention_op(
    "torchrec_hstu::triton_hstu_attention_fwd", ATTENTION_TENSORS, _fwd_impl, attention_output_fake, module=__name__
)
#: Backward op: ``(dq [L, H, Dqk], dk [L, H, Dqk], dv [L, H, Dv])``.
triton_hstu_attention_bwd = define_attention_op(
    "torchrec_hstu::triton_hstu_attention_bwd", ("Tensor dout",) + ATTENTION_TENSORS, _bwd_impl, _bwd_fake,
    returns=GRADIENTS, module=__name__,
)
#: Differentiable forward: the ops' autograd, without the dispatcher in plain eager calls.
triton_hstu_attention_differentiable = register_attention_autograd(triton_hstu_attention_fwd,
                                                                   triton_hstu_attention_bwd)


def check_triton_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        dtypes: Tuple[torch.dtype, ...] = _SUPPORTED_DTYPES) -> None:
    """Raise ``ValueError`` for what the Triton kernels cannot run."""
    if q.dtype not in dtypes:
        raise ValueError(
            f"kernel=TRITON supports q/k/v dtypes {[str(d) for d in dtypes]}; got {q.dtype} "
            "(use kernel=PYTORCH for float64)"
        )
    # While tracing (torch.export on a CPU machine) the op only has to be recorded.
    if not interpret_mode() and not is_tracing() and q.device.type != "cuda":
        raise ValueError(f"kernel=TRITON needs CUDA tensors; got q on {q.device}")
    if q.shape[2] > 256 or v.shape[2] > 256:
        raise ValueError(
            f"kernel=TRITON supports head dims up to 256; got Dqk={q.shape[2]}, Dv={v.shape[2]}"
        )


def triton_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Jagged HSTU attention by the Triton kernels (bf16 / fp16 / fp32, differentiable).

    ``O = (silu(alpha q k^T) / scaling_seqlen * mask) v`` with the mask of ``options``
    (causal, targets, contextual prefix, window, ``min_full_attn_seq_len`` or SLA), computed
    in the kernel from ``seq_offsets`` and ``num_targets``.

    Args:
        q: ``[L, H, Dqk]`` CUDA bf16/fp16/fp32, last dim contiguous.
        k: ``[L, H, Dqk]``.
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]`` int32/int64 offsets.
        max_seq_len: ``N`` >= every sequence length (sets the grid; default divisor).
        alpha: scale of ``q k^T``.
        options: :class:`AttentionOptions` with ``fp8_quant_mode == -1``.
        num_targets: optional ``[B]`` trailing targets per sequence.

    Returns:
        ``[L, H, Dv]`` in the dtype of ``q``.

    Example::

        >>> L, H, D = 300, 2, 64
        >>> q, k, v = (torch.randn(L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> out = triton_hstu_attention(q, k, v, torch.tensor([0, 100, 300], device="cuda"),
        ...                             max_seq_len=200, alpha=0.125, options=AttentionOptions())
        >>> out.shape
        torch.Size([300, 2, 64])
    """
    if options.use_fp8:
        raise ValueError(
            f"triton_hstu_attention is the bf16/fp16/fp32 path; fp8_quant_mode="
            f"{options.fp8_quant_mode} goes to triton_fp8_hstu_attention"
        )
    check_triton_inputs(q, k, v)
    return triton_hstu_attention_differentiable(q, k, v, seq_offsets, num_targets, max_seq_len, float(alpha),
                                                options)
