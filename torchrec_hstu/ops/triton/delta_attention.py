"""Triton delta (KV-cached) HSTU attention, forward only: bf16 / fp16 / fp32 and FP8.

Symbols: ``B`` batch, ``L`` total key tokens, ``L'`` total delta tokens, ``H`` heads,
``Dqk``/``Dv`` head dims. Delta row ``i`` of sequence ``b`` (``delta_offsets``) is the query at
key position ``p = n_b - d_b + i`` (``seq_offsets``); the result is row ``p`` of the full
attention (see :mod:`torchrec_hstu.ops.delta_attention`).

One program per (delta block of ``BLOCK_M`` rows, sequence, head). It runs the full forward
kernel's query-block loop (``_fwd_query_block`` of :mod:`torchrec_hstu.ops.triton.hstu_attention`,
``_fp8_fwd_query_block`` of :mod:`.fp8_attention`) with the block placed at position
``p0 = n_b - d_b + i0`` instead of ``i0``: the same tiles, mask predicate
(:func:`~torchrec_hstu.ops.triton._common.valid_mask`) and key-tile ranges
(:func:`~torchrec_hstu.ops.triton._common.fwd_tile_ranges`, which take any block start), so
masked key tiles are skipped and interior ones run unmasked.

FP8 follows the emulation's "delta-q" rule: ``delta_q`` is quantized with ``delta_offsets``
(mode-2 q blocks and the 16-row P-scale groups start at the first delta row), ``k``/``v`` with
``seq_offsets``; ``BLOCK_M`` is a multiple of 16, so the kernel's P groups are those groups.

No autograd: the delta path serves inference (PYTORCH has the differentiable reference).
"""

import functools
import logging
from typing import List, Optional

import torch
import triton
import triton.language as tl

from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.triton._common import ceil_div, interpret_mode, seq_num_targets, seq_span
from torchrec_hstu.ops.triton.fp8_attention import (
    _batch_quantizer,
    _fp8_block_dim,
    _fp8_fwd_query_block,
    _max_imprecise,
    _row_strides,
    _transposed,
    _vec_strides,
)
from torchrec_hstu.ops.triton.hstu_attention import (
    KernelConfig,
    _block_dim,
    _fast_silu,
    _fwd_query_block,
    _input_precision,
    _last_dim_contiguous,
    _MaskArgs,
    _seq_class,
    check_triton_inputs,
    choose_config,
    mask_args_of,
)

logger = logging.getLogger(__name__)


@triton.jit
def _delta_rows(seq_offsets, delta_offsets, num_targets, H, BLOCK_M: tl.constexpr,
                HAS_TARGETS: tl.constexpr):
    """This program's head and delta rows: ``(h, start, n, q_start, d, i0, m0, T)``, with
    ``start, n`` the sequence's keys, ``q_start, d`` its delta rows, ``i0`` the program's first
    delta row and ``m0 = n - d + i0`` that row's position in the sequence."""
    pid_bh = tl.program_id(0)
    i0 = tl.program_id(1) * BLOCK_M
    b = pid_bh // H
    h = pid_bh % H
    start, n = seq_span(seq_offsets, b)
    q_start, d = seq_span(delta_offsets, b)
    T = seq_num_targets(num_targets, b, HAS_TARGETS)
    return h, start, n, q_start, d, i0, n - d + i0, T


@triton.jit
def _delta_fwd_kernel(
    Q, K, V, Out, seq_offsets, delta_offsets, num_targets,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
    half_alpha, half_alpha_scale,
    c, W, M, sla_k1, K2,
    H,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr, HAS_TARGETS: tl.constexpr, FAST_SILU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    h, start, n, q_start, d, i0, m0, T = _delta_rows(seq_offsets, delta_offsets, num_targets, H,
                                                     BLOCK_M, HAS_TARGETS)
    if i0 >= d:
        return
    offs_i = i0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_in = offs_i < d
    # Rows past d hold q = 0, so they add silu(0) = 0 in the unmasked interior tiles.
    q = tl.load(Q + q_start * stride_qm + h * stride_qh + offs_i[:, None] * stride_qm + offs_dqk[None, :],
                mask=row_in[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    acc = _fwd_query_block(q, K, V, start, h, stride_km, stride_kh, stride_vm, stride_vh, m0, n,
                           T, c, W, M, sla_k1, K2, half_alpha, half_alpha_scale, DQK, DV,
                           BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_MODE, FAST_SILU,
                           INPUT_PRECISION)
    o_ptrs = Out + q_start * stride_om + h * stride_oh + offs_i[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_in[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _fp8_delta_fwd_kernel(
    Q, QD, K, KD, VT, VD, Out, seq_offsets, delta_offsets, num_targets,
    stride_qm, stride_qh, stride_qdm, stride_qdh, stride_km, stride_kh, stride_kdm, stride_kdh,
    stride_vth, stride_vtd, stride_vdm, stride_vdh, stride_vdd, stride_om, stride_oh,
    alpha, out_scale,
    c, W, M, sla_k1, K2,
    H,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, P_ROWS: tl.constexpr,
    QUANT_MODE: tl.constexpr, MASK_MODE: tl.constexpr, HAS_TARGETS: tl.constexpr,
    INTERPRET: tl.constexpr, MAX_IMPRECISE: tl.constexpr, MAX_IMPRECISE_S: tl.constexpr,
):
    h, start, n, q_start, d, i0, m0, T = _delta_rows(seq_offsets, delta_offsets, num_targets, H,
                                                     BLOCK_M, HAS_TARGETS)
    if i0 >= d:
        return
    offs_i = i0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_in = offs_i < d
    q = tl.load(Q + q_start * stride_qm + h * stride_qh + offs_i[:, None] * stride_qm + offs_dqk[None, :],
                mask=row_in[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    qd = tl.load(QD + q_start * stride_qdm + h * stride_qdh + offs_i * stride_qdm, mask=row_in, other=1.0)
    acc = _fp8_fwd_query_block(
        q, qd, K, KD, VT, VD, start, h, stride_km, stride_kh, stride_kdm, stride_kdh, stride_vth,
        stride_vtd, stride_vdm, stride_vdh, stride_vdd, m0, n, T, c, W, M, sla_k1, K2, alpha,
        DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N, P_ROWS, QUANT_MODE, MASK_MODE, INTERPRET,
        MAX_IMPRECISE, MAX_IMPRECISE_S)
    o_ptrs = Out + q_start * stride_om + h * stride_oh + offs_i[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, (acc * out_scale).to(Out.dtype.element_ty),
             mask=row_in[:, None] & (offs_dv[None, :] < DV))


def _delta_block_m(max_delta_len: int, minimum: int) -> int:
    """Query rows per program: the smallest of 16/32/64 holding the longest delta (>= minimum)."""
    for block in (16, 32, 64):
        if block >= minimum and max_delta_len <= block:
            return block
    return max(64, minimum)


def delta_fwd_candidates(block_m: int, dtype: torch.dtype) -> List[KernelConfig]:
    """Configs for a delta block of ``block_m`` rows, the default first."""
    if interpret_mode():
        return [KernelConfig(block_m, 16, 4, 1)]
    if dtype == torch.float32:
        return [KernelConfig(block_m, 32, 4, 2), KernelConfig(block_m, 64, 4, 2)]
    return [KernelConfig(block_m, 64, 4, 3), KernelConfig(block_m, 128, 4, 3),
            KernelConfig(block_m, 128, 8, 3), KernelConfig(block_m, 32, 4, 4)]


def delta_fwd(
    delta_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    delta_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    max_delta_len: int,
    alpha: float,
    scaling_seqlen: int,
    mask: _MaskArgs,
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """Launch the bf16/fp16/fp32 delta kernel; returns ``[L', H, Dv]``."""
    total_q, num_heads, dqk = delta_q.shape
    dv = v.shape[2]
    out = torch.empty((total_q, num_heads, dv), dtype=delta_q.dtype, device=delta_q.device)
    batch = seq_offsets.numel() - 1
    if total_q == 0 or batch == 0 or max_delta_len == 0:
        return out.zero_()
    delta_q, k, v = _last_dim_contiguous(delta_q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    block_dqk, block_dv = _block_dim(dqk), _block_dim(dv)
    scale = 1.0 / scaling_seqlen
    block_m = _delta_block_m(max_delta_len, 16)

    def run(cfg: KernelConfig) -> None:
        grid = (batch * num_heads, ceil_div(max_delta_len, cfg.block_m))
        _delta_fwd_kernel[grid](
            delta_q, k, v, out, seq_offsets, delta_offsets,
            num_targets if num_targets is not None else seq_offsets,
            delta_q.stride(0), delta_q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            0.5 * alpha, 0.5 * alpha * scale,
            mask.c, mask.w, mask.m, mask.sla_k1, mask.k2,
            num_heads,
            DQK=dqk, DV=dv, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            MASK_MODE=mask.mode, HAS_TARGETS=mask.has_targets, FAST_SILU=_fast_silu(delta_q.dtype),
            INPUT_PRECISION=_input_precision(delta_q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if config is None:
        key = ("delta_fwd", delta_q.dtype, block_dqk, block_dv, mask.mode, _seq_class(max_seq_len), block_m)
        config = choose_config(key, functools.partial(delta_fwd_candidates, block_m, delta_q.dtype),
                               max_seq_len, run)
    run(config)
    return out


def fp8_delta_fwd(
    delta_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    delta_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    max_delta_len: int,
    alpha: float,
    scaling_seqlen: int,
    mask: _MaskArgs,
    fp8_quant_mode: int,
    num_warps: Optional[int] = None,
) -> torch.Tensor:
    """Quantize (delta-q rule) and launch the FP8 delta kernel; returns ``[L', H, Dv]``."""
    from torchrec_hstu.ops.fp8.quantize import FP8TileSizes
    from torchrec_hstu.ops.triton.fp8_quantize import triton_quantize_for_mode

    total_q, num_heads, dqk = delta_q.shape
    dv = v.shape[2]
    out = torch.empty((total_q, num_heads, dv), dtype=delta_q.dtype, device=delta_q.device)
    batch = seq_offsets.numel() - 1
    if total_q == 0 or batch == 0 or max_delta_len == 0:
        return out.zero_()
    tiles = FP8TileSizes.for_head_dim(max(dqk, dv))
    chunk = tiles.colwise_chunk
    # Fused Triton quantizers: ops.fp8.quantize's (the emulation's) descales, fp8 codes within
    # one step at rounding ties (reciprocal multiply, as the default "fast" accumulation).
    q_q = triton_quantize_for_mode(delta_q, delta_offsets, fp8_quant_mode, tiles.fwd_block_m, chunk=chunk,
                                   max_seq_len=max_delta_len)
    # k and v share seq_offsets and their tile: one set of block offsets for both.
    quantize_kv = _batch_quantizer(seq_offsets, max_seq_len, fp8_quant_mode, chunk, exact=False)
    k_q = quantize_kv(k, tiles.fwd_block_n)
    v_q = quantize_kv(v, tiles.fwd_block_n, colwise=True)
    q8, k8, vt = q_q.values, k_q.values, _transposed(v_q.values)
    block_dqk, block_dv = _fp8_block_dim(dqk), _fp8_block_dim(dv)
    # 64 rows per program on the GPU, as the full FP8 forward (fp8 dots of 64 x BLOCK_N map to
    # one Hopper warpgroup MMA); the interpreter takes the smallest block holding the delta.
    block_m = min(_delta_block_m(max_delta_len, tiles.fwd_p_rows), 32) if interpret_mode() else 64
    grid = (batch * num_heads, ceil_div(max_delta_len, block_m))
    _fp8_delta_fwd_kernel[grid](
        q8, q_q.token_descale, k8, k_q.token_descale, vt, v_q.token_descale, out, seq_offsets,
        delta_offsets, num_targets if num_targets is not None else seq_offsets,
        q8.stride(0), q8.stride(1), *_row_strides(q_q.token_descale),
        k8.stride(0), k8.stride(1), *_row_strides(k_q.token_descale),
        vt.stride(0), vt.stride(1), *_vec_strides(v_q.token_descale),
        out.stride(0), out.stride(1),
        alpha, 1.0 / scaling_seqlen,
        mask.c, mask.w, mask.m, mask.sla_k1, mask.k2,
        num_heads,
        DQK=dqk, DV=dv, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        BLOCK_M=block_m, BLOCK_N=tiles.fwd_block_n, P_ROWS=tiles.fwd_p_rows,
        QUANT_MODE=fp8_quant_mode, MASK_MODE=mask.mode, HAS_TARGETS=mask.has_targets,
        INTERPRET=interpret_mode(), MAX_IMPRECISE=_max_imprecise(False),
        MAX_IMPRECISE_S=_max_imprecise(True),
        num_warps=num_warps or (1 if interpret_mode() else 4), num_stages=1 if interpret_mode() else 3,
    )
    return out


def triton_delta_hstu_attention(
    delta_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    delta_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
    uniform_delta: Optional[int] = None,
) -> torch.Tensor:
    """Delta attention by the Triton kernels (forward only), bf16/fp16/fp32 or FP8.

    Args:
        delta_q: ``[L', H, Dqk]`` CUDA queries of the last ``d_b`` tokens of each sequence.
        k: ``[L, H, Dqk]`` full keys.
        v: ``[L, H, Dv]`` full values.
        seq_offsets: ``[B + 1]`` offsets of ``k``/``v``.
        delta_offsets: ``[B + 1]`` offsets of ``delta_q``.
        max_seq_len: batch maximum of the full lengths (default divisor).
        alpha: scale of ``q k^T``.
        options: mask options; ``fp8_quant_mode`` 0..5 runs the FP8 kernel (SM89+).
        num_targets: optional ``[B]``.
        uniform_delta: ``d`` when every sequence has ``d`` delta rows (saves a host read).

    Returns:
        ``[L', H, Dv]`` in the dtype of ``delta_q``.

    Example::

        >>> k = v = torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16)
        >>> delta_q = torch.randn(32, 2, 64, device="cuda", dtype=torch.bfloat16)
        >>> seq_offsets = torch.tensor([0, 100, 300], device="cuda")
        >>> delta_offsets = torch.tensor([0, 16, 32], device="cuda")
        >>> triton_delta_hstu_attention(delta_q, k, v, seq_offsets, delta_offsets, 200, 0.125,
        ...                             AttentionOptions()).shape
        torch.Size([32, 2, 64])
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (delta_q, k, v)):
        raise ValueError(
            "kernel=TRITON delta attention is forward-only (inference); call it under "
            "torch.no_grad() / torch.inference_mode(), or use kernel=PYTORCH for gradients"
        )
    check_triton_inputs(delta_q, k, v)
    if uniform_delta is not None:
        max_delta_len = uniform_delta
    else:
        lengths = delta_offsets[1:] - delta_offsets[:-1]
        max_delta_len = int(lengths.max()) if lengths.numel() > 0 else 0
    mask = mask_args_of(options, num_targets is not None)
    scaling_seqlen = options.resolve_scaling_seqlen(int(max_seq_len))
    if options.use_fp8:
        from torchrec_hstu.ops.fp8.arch import check_fp8_support

        if delta_q.shape[2] < 16 or v.shape[2] < 16:
            raise ValueError(
                f"TRITON FP8 needs head dims >= 16; got Dqk={delta_q.shape[2]}, Dv={v.shape[2]}"
            )
        check_fp8_support("TRITON", options.fp8_quant_mode, delta_q.shape[2], v.shape[2], delta_q.device)
        return fp8_delta_fwd(delta_q, k, v, seq_offsets, delta_offsets, num_targets, int(max_seq_len),
                             max_delta_len, float(alpha), scaling_seqlen, mask, options.fp8_quant_mode)
    return delta_fwd(delta_q, k, v, seq_offsets, delta_offsets, num_targets, int(max_seq_len),
                     max_delta_len, float(alpha), scaling_seqlen, mask)
