"""Exact PyTorch emulation of the CUTLASS (SM90) FP8 HSTU attention kernel, forward and backward.

Symbols: ``B`` batch, ``L`` total tokens, ``H`` heads, ``Dqk``/``Dv`` head dims, ``N`` a padded
sequence length, ``s`` a scale. The definition (notes decision 5, ``anchor-cutlass-fp8.md``):

Forward (tiles ``BM x BN`` = ``fwd_block_m x fwd_block_n``, P scale rows ``R = fwd_p_rows``):

1. q, k (and v) are quantized from the inputs with the mode's quantizer (:mod:`.quantize`):
   mode 1 uses row-wise q, k and column-wise v; mode 2 blocks of ``BM`` (q) and ``BN`` (k, v).
2. ``S = q8 k8^T`` (an exact fp8 GEMM rounded once to float32) ``* (q_descale x k_descale)``
   ``* alpha``; masked entries dropped; ``P = silu(S)`` (exact silu, decision 5).
3. Per tile of ``R`` query rows x ``BN`` keys: ``s_P = max(amax|P| / 448, 1e-6)``,
   ``P8 = sat_e4m3(P / s_P)`` (mode 0: ``P8 = sat_e4m3(P)``, ``s_P = 1``).
4. ``O = sum over key tiles n of (P8[:, n] @ v8[n]) * (s_P * v_descale[n]) / scaling_seqlen``
   (the tile product rounded to float32, then scaled and accumulated in float32; ``v_descale``
   is per-d for mode 1). The output has the input dtype (decision 6).

Backward (tiles ``bwd_block_m x bwd_block_n``, both P and dS scaled per whole tile, or per row
of the tile with ``FP8TileSizes.bwd_row_scales``: see there): q, k, v and
dO are re-quantized from the high-precision tensors with the backward block sizes (mode 1:
row-wise for ``S`` and ``dP``, column-wise q, k, dO for the products along tokens), then::

    S, P as forward;  dP = (dO8 v8^T) * (dO_descale x v_descale);  dS = dP * silu'(S)
    P8, s_P = tile_quant(P);  dS8, s_dS = tile_quant(dS)
    dV[n] = sum_m (P8[m, n]^T  @ dO8c[m]) * (s_P[m, n]  * dO_descale_c[m]) / scaling_seqlen
    dK[n] = sum_m (dS8[m, n]^T @ q8c[m])  * (s_dS[m, n] * q_descale_c[m])  * alpha / scaling_seqlen
    dQ[m] = sum_n (dS8[m, n]   @ k8c[n])  * (s_dS[m, n] * k_descale_c[n])  * alpha / scaling_seqlen

(with row scales, dQ's sum runs over spans of ``bwd_dq_block_n`` keys, each with its own
per-query ``s_dS``; ``k_descale_c`` is constant over a span).

Every fp8 x fp8 product is exact (computed in float64, where sums of up to 2^17 products of
e4m3 values are exact) and rounded once to float32, so the result does not depend on a
summation order; silu and its derivative are evaluated in float64 and rounded to float32. The
remaining float32 order dependence is the accumulation over tiles.

Sequences are grouped by length (as the PyTorch reference does) and each group is padded to a
multiple of every tile size, so all tiles of a group are handled by one reshape: no Python
loop over tiles.
"""

from typing import List, Optional, Tuple

import torch

from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.fp8.arch import check_fp8_quant_mode
from torchrec_hstu.ops.fp8.quantize import (
    FP8Quantized,
    FP8TileSizes,
    quantize_for_mode,
    quantize_tiles,
)
from torchrec_hstu.ops.pytorch.hstu_attention import _attention_plan, _gather_index, build_mask

_Group = Tuple[torch.Tensor, torch.Tensor]  # (gather index [b, N], mask [b, 1 or H, N, N])


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _func_mask(func: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Decode the CUTLASS arbitrary mask ``func: [H, 3, L]`` for one group -> ``[b, H, N, N]``.

    Query row ``i`` sees key ``j`` iff ``j < f0[i]`` or ``f1[i] <= j < f2[i]`` (and ``j`` is in
    the sequence).
    """
    padded_len = index.shape[1]
    padded = torch.cat([func.to(torch.int64), func.new_zeros(func.shape[0], 3, 1, dtype=torch.int64)], dim=2)
    f = padded.index_select(2, index.reshape(-1)).view(func.shape[0], 3, *index.shape)
    f = f.permute(2, 0, 3, 1)  # [b, H, N, 3]
    cols = torch.arange(padded_len, device=func.device)
    in_prefix = cols < f[..., 0:1]
    in_interval = (cols >= f[..., 1:2]) & (cols < f[..., 2:3])
    return (in_prefix | in_interval) & (cols < lengths.view(-1, 1, 1, 1))


def _plan_groups(
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor],
    func: Optional[torch.Tensor],
    tiles: FP8TileSizes,
    total_len: int,
) -> List[_Group]:
    offsets = seq_offsets.to(torch.int64)
    seq_lengths = offsets[1:] - offsets[:-1]
    groups: List[_Group] = []
    for seq_ids, padded_len in _attention_plan(offsets, max_seq_len, None):
        padded_len = _round_up(padded_len, tiles.padding_multiple)
        lengths = seq_lengths.index_select(0, seq_ids)
        index = _gather_index(offsets[:-1].index_select(0, seq_ids), lengths, padded_len, total_len)
        if func is not None:
            mask = _func_mask(func, index, lengths)
        else:
            targets = None if num_targets is None else num_targets.to(torch.int64).index_select(0, seq_ids)
            mask = build_mask(options, lengths, padded_len, targets).unsqueeze(1)
        # Padded query rows must not reach any tile's amax.
        rows = torch.arange(padded_len, device=index.device)
        mask = mask & (rows < lengths.view(-1, 1)).view(-1, 1, padded_len, 1)
        groups.append((index, mask))
    return groups


class _PaddedOperand:
    """A quantized jagged operand with one padding row appended (values 0, descale 1), gathered
    per group into ``[b, H, N, D]``: values in float64 (exact), descales in float32."""

    def __init__(self, quantized: FP8Quantized) -> None:
        self.values = self._pad(quantized.values.to(torch.float64), 0.0)
        self.descale = self._pad(quantized.token_descale.float(), 1.0)

    @staticmethod
    def _pad(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.cat([x, x.new_full((1,) + tuple(x.shape[1:]), value)])

    @staticmethod
    def _gather(padded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # index_select: advanced indexing is far slower on small CPU tensors.
        rows = padded.index_select(0, index.reshape(-1))
        return rows.view(tuple(index.shape) + tuple(padded.shape[1:])).transpose(1, 2)

    def values_at(self, index: torch.Tensor) -> torch.Tensor:
        return self._gather(self.values, index)

    def descale_at(self, index: torch.Tensor) -> torch.Tensor:
        return self._gather(self.descale, index)


def _exact_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of fp8 values held in float64 (exact), rounded once to float32."""
    return torch.matmul(a, b).float()


def _silu(s: torch.Tensor) -> torch.Tensor:
    s64 = s.double()
    return (s64 * torch.sigmoid(s64)).float()


def _silu_and_derivative(s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    s64 = s.double()
    sig = torch.sigmoid(s64)
    return (s64 * sig).float(), (sig * (1.0 + s64 * (1.0 - sig))).float()


def _scatter_rows(
    chunks: List[Tuple[torch.Tensor, torch.Tensor]],
    total_len: int,
    num_heads: int,
    dim: int,
    device: torch.device,
) -> torch.Tensor:
    """Write padded ``[b, H, N, D]`` results back to jagged ``[L, H, D]`` (padded rows dropped)."""
    result = torch.zeros((total_len + 1, num_heads, dim), dtype=torch.float32, device=device)
    if chunks:
        index = torch.cat([i.reshape(-1) for i, _ in chunks])
        values = torch.cat([x.transpose(1, 2).reshape(-1, num_heads, dim) for _, x in chunks])
        result = result.index_copy(0, index, values)
    return result[:total_len]


def _scores(
    q8: torch.Tensor,
    k8: torch.Tensor,
    q_descale: torch.Tensor,
    k_descale: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Dequantized ``S = (q8 k8^T) * (q_descale x k_descale) * alpha`` -> ``[b, H, N, N]``."""
    s = _exact_gemm(q8, k8.transpose(-1, -2))
    return s * (q_descale * k_descale.transpose(-1, -2)) * alpha


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    groups: List[_Group],
    alpha: float,
    scaling_seqlen: int,
    mode: int,
    tiles: FP8TileSizes,
) -> torch.Tensor:
    total_len, num_heads, dim_v = v.shape
    chunk = tiles.colwise_chunk
    q_q = _PaddedOperand(quantize_for_mode(q, seq_offsets, mode, tiles.fwd_block_m, chunk=chunk))
    k_q = _PaddedOperand(quantize_for_mode(k, seq_offsets, mode, tiles.fwd_block_n, chunk=chunk))
    v_q = _PaddedOperand(quantize_for_mode(v, seq_offsets, mode, tiles.fwd_block_n, colwise=True, chunk=chunk))
    rows, bn = tiles.fwd_p_rows, tiles.fwd_block_n
    outputs = []
    for index, mask in groups:
        b, n = index.shape
        s = _scores(q_q.values_at(index), k_q.values_at(index), q_q.descale_at(index), k_q.descale_at(index), alpha)
        p = torch.where(mask, _silu(s), 0.0)
        p8, p_scale = quantize_tiles(p, rows, bn, scaled=mode != 0)
        tiles_n = n // bn
        v8 = v_q.values_at(index).reshape(b, num_heads, tiles_n, bn, dim_v)
        partial = torch.einsum("bhmtk,bhtkd->bhmtd", p8.double().reshape(b, num_heads, n, tiles_n, bn), v8).float()
        v_descale = v_q.descale_at(index)[:, :, ::bn]  # [b, H, tiles_n, Dv or 1]: the tile's descale
        scale = p_scale.repeat_interleave(rows, dim=2).unsqueeze(-1) * v_descale.unsqueeze(2)
        outputs.append((index, (partial * scale).sum(dim=3) / scaling_seqlen))
    return _scatter_rows(outputs, total_len, num_heads, dim_v, v.device)


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    groups: List[_Group],
    alpha: float,
    scaling_seqlen: int,
    mode: int,
    tiles: FP8TileSizes,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    total_len, num_heads, dim_qk = q.shape
    dim_v = v.shape[2]
    bm, bn, chunk = tiles.bwd_block_m, tiles.bwd_block_n, tiles.colwise_chunk

    def quant(x: torch.Tensor, block: int) -> Tuple[_PaddedOperand, _PaddedOperand]:
        row = _PaddedOperand(quantize_for_mode(x, seq_offsets, mode, block, chunk=chunk))
        if mode != 1:
            return row, row
        return row, _PaddedOperand(quantize_for_mode(x, seq_offsets, mode, block, colwise=True, chunk=chunk))

    q_r, q_c = quant(q, bm)
    do_r, do_c = quant(dout, bm)
    k_r, k_c = quant(k, bn)
    v_r = _PaddedOperand(quantize_for_mode(v, seq_offsets, mode, bn, chunk=chunk))
    grad_scale = alpha / scaling_seqlen
    dqs, dks, dvs = [], [], []
    for index, mask in groups:
        b, n = index.shape
        tiles_m = n // bm
        s = _scores(q_r.values_at(index), k_r.values_at(index), q_r.descale_at(index), k_r.descale_at(index), alpha)
        p, dsilu = _silu_and_derivative(s)
        p = torch.where(mask, p, 0.0)
        dp = _scores(do_r.values_at(index), v_r.values_at(index), do_r.descale_at(index), v_r.descale_at(index), 1.0)
        ds = torch.where(mask, dp * dsilu, 0.0)
        # Scales along keys for the products along queries (dV, dK), [b, H, tiles_m, N, 1]:
        # per tile, or per key of the tile (row scales).
        key_cols = 1 if tiles.bwd_row_scales else bn
        p8, p_scale = quantize_tiles(p, bm, key_cols, scaled=mode != 0)
        ds8, ds_scale = quantize_tiles(ds, bm, key_cols, scaled=mode != 0)
        p_scale_cols = p_scale.repeat_interleave(key_cols, dim=-1).unsqueeze(-1)
        ds_scale_cols = ds_scale.repeat_interleave(key_cols, dim=-1).unsqueeze(-1)
        # Products along queries (dV, dK): per query tile m, scaled by the tile's column descale.
        p8_m = p8.double().reshape(b, num_heads, tiles_m, bm, n)
        ds8_m = ds8.double().reshape(b, num_heads, tiles_m, bm, n)
        do8_m = do_c.values_at(index).reshape(b, num_heads, tiles_m, bm, dim_v)
        q8_m = q_c.values_at(index).reshape(b, num_heads, tiles_m, bm, dim_qk)
        do_descale = do_c.descale_at(index)[:, :, ::bm].unsqueeze(3)  # [b, H, tiles_m, 1, Dv or 1]
        q_descale = q_c.descale_at(index)[:, :, ::bm].unsqueeze(3)
        dv_part = torch.einsum("bhtmn,bhtmd->bhtnd", p8_m, do8_m).float()
        dv = (dv_part * (p_scale_cols * do_descale)).sum(dim=2) / scaling_seqlen
        dk_part = torch.einsum("bhtmn,bhtmd->bhtnd", ds8_m, q8_m).float()
        dk = (dk_part * (ds_scale_cols * q_descale)).sum(dim=2) * grad_scale
        # dQ: per key span (the tile, or under row scales bwd_dq_block_n keys of it), scaled
        # by the span's k column descale. dS scales along queries, [b, H, N, spans, 1]: the
        # tile's, or (row scales) each query's over the span.
        if tiles.bwd_row_scales:
            span = tiles.bwd_dq_block_n
            ds8, ds_scale = quantize_tiles(ds, 1, span, scaled=mode != 0)
            ds_scale_rows = ds_scale.unsqueeze(-1)
        else:
            span = bn
            ds_scale_rows = ds_scale.repeat_interleave(bm, dim=2).unsqueeze(-1)
        ds8_n = ds8.double().reshape(b, num_heads, n, n // span, span)
        k8_n = k_c.values_at(index).reshape(b, num_heads, n // span, span, dim_qk)
        k_descale = k_c.descale_at(index)[:, :, ::span].unsqueeze(2)  # [b, H, 1, spans, Dqk or 1]
        dq_part = torch.einsum("bhmtk,bhtkd->bhmtd", ds8_n, k8_n).float()
        dq = (dq_part * (ds_scale_rows * k_descale)).sum(dim=3) * grad_scale
        dqs.append((index, dq))
        dks.append((index, dk))
        dvs.append((index, dv))
    device = q.device
    return (
        _scatter_rows(dqs, total_len, num_heads, dim_qk, device),
        _scatter_rows(dks, total_len, num_heads, dim_qk, device),
        _scatter_rows(dvs, total_len, num_heads, dim_v, device),
    )


class FP8HSTUAttentionFunction(torch.autograd.Function):
    """Autograd of the emulation: the forward quantizes and saves only the high-precision
    inputs; the backward re-quantizes them (and dO) with the backward block sizes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_offsets: torch.Tensor,
        num_targets: Optional[torch.Tensor],
        func: Optional[torch.Tensor],
        max_seq_len: int,
        alpha: float,
        options: AttentionOptions,
        tiles: FP8TileSizes,
    ) -> torch.Tensor:
        mode = options.fp8_quant_mode
        scaling_seqlen = options.resolve_scaling_seqlen(max_seq_len)
        groups = _plan_groups(seq_offsets, max_seq_len, options, num_targets, func, tiles, q.shape[0])
        out = _forward(q, k, v, seq_offsets, groups, alpha, scaling_seqlen, mode, tiles)
        ctx.save_for_backward(q, k, v, seq_offsets)
        ctx.groups = groups
        ctx.alpha, ctx.scaling_seqlen, ctx.mode, ctx.tiles = alpha, scaling_seqlen, mode, tiles
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, seq_offsets = ctx.saved_tensors
        dq, dk, dv = _backward(
            dout, q, k, v, seq_offsets, ctx.groups, ctx.alpha, ctx.scaling_seqlen, ctx.mode, ctx.tiles
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def fp8_hstu_attention_emulated(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
    tile_sizes: Optional[FP8TileSizes] = None,
    func: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """FP8 HSTU attention with the CUTLASS kernel's numerics, on any device, with autograd.

    Args:
        q: ``[L, H, Dqk]`` (float16/bfloat16/float32/float64).
        k: ``[L, H, Dqk]``.
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]``.
        max_seq_len: batch maximum length (default ``scaling_seqlen``).
        alpha: scale of ``q k^T``.
        options: mask options; ``options.fp8_quant_mode`` in 0..5 picks the mode.
        num_targets: optional ``[B]``.
        tile_sizes: kernel tiles (default: the SM90 kernel's for ``max(Dqk, Dv)``).
        func: optional CUTLASS arbitrary mask ``[H, 3, L]`` int (``[col_max0, col_min0,
            col_max1]`` per query); replaces the mask of ``options`` when given.

    Returns:
        ``[L, H, Dv]`` in the dtype of ``q``.

    Example::

        >>> q = k = v = torch.randn(5, 2, 8)
        >>> opts = AttentionOptions(fp8_quant_mode=3)
        >>> fp8_hstu_attention_emulated(q, k, v, torch.tensor([0, 3, 5]), 3, 0.35, opts).shape
        torch.Size([5, 2, 8])
    """
    check_fp8_quant_mode(options.fp8_quant_mode)
    if tile_sizes is None:
        tile_sizes = FP8TileSizes.for_head_dim(max(q.shape[-1], v.shape[-1]))
    if func is not None and (func.dim() != 3 or func.shape[0] != q.shape[1] or func.shape[1] != 3
                             or func.shape[2] != q.shape[0]):
        raise ValueError(
            f"func must be [H, 3, L] = [{q.shape[1]}, 3, {q.shape[0]}]; got {tuple(func.shape)}"
        )
    return FP8HSTUAttentionFunction.apply(
        q, k, v, seq_offsets, num_targets, func, max_seq_len, alpha, options, tile_sizes
    )
