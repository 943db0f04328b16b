"""PyTorch reference of delta (KV-cached) HSTU attention: high precision and the FP8 emulation.

Symbols: ``B`` batch, ``L`` total key tokens, ``L'`` total delta (query) tokens, ``H`` heads,
``Dqk``/``Dv`` head dims. Sequence ``b`` has ``n_b`` keys (``seq_offsets``) of which the last
``d_b`` are also queries (``delta_offsets``): delta row ``i`` of sequence ``b`` sits at key
position ``p = n_b - d_b + i`` and its output is row ``p`` of the full attention::

    O[i] = sum_j silu(alpha * q_i . k_j) / scaling_seqlen * mask(p, j) * v_j

with the mask of :mod:`torchrec_hstu.ops.masks` evaluated at query position ``p`` (every option:
causal, targets, contextual prefix, window, ``min_full_attn_seq_len``, SLA). ``scaling_seqlen``
-1 means ``max_seq_len``, the batch maximum of the *full* lengths ``n_b``, so a delta step
divides by what the full forward divides by.

FP8 (``fp8_quant_mode`` 0..5, ``anchor-cutlass-fp8.md`` section 7, "delta-q"): the emulation of
:mod:`torchrec_hstu.ops.fp8.emulation` with ``Lq < Lk``. The delta queries are quantized as a
jagged tensor of their own (``delta_offsets``): mode 2's q blocks and the 16-row P-scale groups
start at each sequence's first delta query, modes 3/4 take amax over the delta rows, mode 5
over ``delta_q``; k and v are quantized over the full sequences, and key tiles start at key 0.
So for modes 1..5 the result generally differs from rows of the full FP8 forward (whose q
groups start at position 0); mode 0 (no scales) equals them.

Sequences are grouped by key length as in the full reference; a group is padded to its longest
key sequence and its longest delta. The high-precision path is differentiable (plain ops);
the FP8 path is forward only (inference).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from torchrec_hstu.ops.common import AttentionOptions, is_tracing
from torchrec_hstu.ops.fp8.arch import check_fp8_quant_mode
from torchrec_hstu.ops.fp8.emulation import (
    _PaddedOperand,
    _round_up,
    _scatter_rows,
    _scores,
    _silu,
)
from torchrec_hstu.ops.fp8.quantize import FP8TileSizes, quantize_for_mode, quantize_tiles
from torchrec_hstu.ops.jagged import gather_index_from_starts
from torchrec_hstu.ops.pytorch.hstu_attention import build_mask, group_sequences_by_length

#: ``(sequence ids [b], padded key length Nk, padded delta length Nq)`` of one group.
_DeltaGroup = Tuple[torch.Tensor, int, int]


def _delta_plan(
    seq_offsets: torch.Tensor,
    delta_offsets: torch.Tensor,
    max_seq_len: int,
    uniform_delta: Optional[int],
) -> List[_DeltaGroup]:
    """Length groups by key length, each with its padded key and delta lengths.

    Eager: one host read of both offsets. Tracing: one group of all sequences padded to
    ``max_seq_len + 1`` keys and ``uniform_delta`` (or ``max_seq_len + 1``) queries.
    """
    batch_size = seq_offsets.numel() - 1
    device = seq_offsets.device
    if is_tracing():
        max_delta = uniform_delta if uniform_delta is not None else max_seq_len + 1
        return [(torch.arange(batch_size, device=device), max_seq_len + 1, max_delta)]
    key_lengths = (seq_offsets[1:] - seq_offsets[:-1]).tolist()
    delta_lengths = (delta_offsets[1:] - delta_offsets[:-1]).tolist()
    # Sequences without delta rows produce no output: leave them out of the plan.
    active = [n if d > 0 else 0 for n, d in zip(key_lengths, delta_lengths)]
    plan: List[_DeltaGroup] = []
    for indices, padded_len in group_sequences_by_length(active):
        max_delta = max(delta_lengths[b] for b in indices)
        plan.append((torch.tensor(indices, device=device), padded_len, max_delta))
    return plan


def _group_indices(
    seq_ids: torch.Tensor,
    seq_offsets: torch.Tensor,
    delta_offsets: torch.Tensor,
    num_keys: int,
    num_queries: int,
    total_keys: int,
    total_queries: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(key_index [b, Nk], query_index [b, Nq], key_lengths [b], query_positions [b, Nq])``.

    Padded slots index the extra row ``L`` (keys) / ``L'`` (queries); a padded query slot gets
    a position ``>= n_b``.
    """
    key_starts = seq_offsets[:-1].index_select(0, seq_ids)
    key_lengths = (seq_offsets[1:] - seq_offsets[:-1]).index_select(0, seq_ids)
    delta_starts = delta_offsets[:-1].index_select(0, seq_ids)
    delta_lengths = (delta_offsets[1:] - delta_offsets[:-1]).index_select(0, seq_ids)
    key_index = gather_index_from_starts(key_starts, key_lengths, num_keys, total_keys)
    query_index = gather_index_from_starts(delta_starts, delta_lengths, num_queries, total_queries)
    rows = torch.arange(num_queries, device=seq_ids.device, dtype=torch.int64).unsqueeze(0)
    query_positions = (key_lengths - delta_lengths).unsqueeze(1) + rows
    return key_index, query_index, key_lengths, query_positions


def _padded_rows(x: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``index [b, N]`` of jagged ``x [L, H, D]`` as ``[b, H, N, D]`` in ``dtype``.

    Padded slots (``index == L``) read row 0 (no padded copy of ``x`` is made); callers mask
    them (keys: weight 0, so no gradient either) or drop them (queries).
    """
    read_index = torch.where(index < x.shape[0], index, torch.zeros_like(index))
    rows = x.index_select(0, read_index.reshape(-1)).to(dtype)
    return rows.view(tuple(index.shape) + tuple(x.shape[1:])).transpose(1, 2)


def _group_mask(
    options: AttentionOptions,
    key_lengths: torch.Tensor,
    num_keys: int,
    num_targets: Optional[torch.Tensor],
    seq_ids: torch.Tensor,
    query_positions: torch.Tensor,
) -> torch.Tensor:
    """``[b, Nq, Nk]`` bool: the full mask's rows at ``query_positions``; rows past ``n_b`` off."""
    targets = None if num_targets is None else num_targets.to(torch.int64).index_select(0, seq_ids)
    mask = build_mask(options, key_lengths, num_keys, targets, query_positions)
    return mask & (query_positions < key_lengths.unsqueeze(1)).unsqueeze(-1)


def pytorch_delta_hstu_attention(
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
    """Reference delta attention in high precision (float32, float64 for float64 inputs).

    Args:
        delta_q: ``[L', H, Dqk]`` queries of the last ``d_b`` tokens of each sequence.
        k: ``[L, H, Dqk]`` keys of the full sequences (cached prefix + delta).
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]`` offsets of ``k``/``v``.
        delta_offsets: ``[B + 1]`` offsets of ``delta_q`` (``d_b <= n_b``).
        max_seq_len: batch maximum of the full lengths (default ``scaling_seqlen``).
        alpha: scale of ``q k^T``.
        options: mask options; ``fp8_quant_mode`` must be -1.
        num_targets: optional ``[B]`` trailing targets of the full sequences.
        uniform_delta: ``d`` when every sequence has ``d`` delta rows (static padding under
            tracing), else None.

    Returns:
        ``[L', H, Dv]`` in the dtype of ``delta_q`` (differentiable).
    """
    if options.use_fp8:
        raise ValueError(
            "pytorch_delta_hstu_attention computes in high precision; fp8_quant_mode="
            f"{options.fp8_quant_mode} goes through fp8_delta_hstu_attention_emulated"
        )
    total_queries, num_heads, _ = delta_q.shape
    total_keys = k.shape[0]
    dim_v = v.shape[2]
    compute_dtype = torch.float64 if delta_q.dtype == torch.float64 else torch.float32
    out_scale = 1.0 / options.resolve_scaling_seqlen(max_seq_len)
    seq_offsets = seq_offsets.to(torch.int64)
    delta_offsets = delta_offsets.to(torch.int64)
    chunks: List[torch.Tensor] = []
    indices: List[torch.Tensor] = []
    with torch.autocast(device_type=delta_q.device.type, enabled=False):
        for seq_ids, num_keys, num_queries in _delta_plan(seq_offsets, delta_offsets, max_seq_len, uniform_delta):
            key_index, query_index, key_lengths, positions = _group_indices(
                seq_ids, seq_offsets, delta_offsets, num_keys, num_queries, total_keys, total_queries
            )
            mask = _group_mask(options, key_lengths, num_keys, num_targets, seq_ids, positions)
            qg = _padded_rows(delta_q, query_index, compute_dtype)
            kg = _padded_rows(k, key_index, compute_dtype)
            vg = _padded_rows(v, key_index, compute_dtype)
            scores = torch.matmul(qg * alpha, kg.transpose(-1, -2))
            weights = torch.where(mask.unsqueeze(1), F.silu(scores), 0.0)
            out = torch.matmul(weights, vg) * out_scale  # [b, H, Nq, Dv]
            chunks.append(out.transpose(1, 2).reshape(-1, num_heads, dim_v))
            indices.append(query_index.reshape(-1))
        result = delta_q.new_zeros((total_queries + 1, num_heads, dim_v), dtype=compute_dtype)
        if chunks:
            # Padded query slots all write the spare row L', which is dropped.
            result = result.index_copy(0, torch.cat(indices), torch.cat(chunks))
    return result[:total_queries].to(delta_q.dtype)


def fp8_delta_hstu_attention_emulated(
    delta_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    delta_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
    tile_sizes: Optional[FP8TileSizes] = None,
) -> torch.Tensor:
    """FP8 delta attention with the CUTLASS kernel's numerics ("delta-q" rule), forward only.

    1. ``delta_q`` quantized with ``delta_offsets`` (mode 2 blocks of ``fwd_block_m`` from each
       sequence's first delta query), ``k`` / ``v`` with ``seq_offsets`` (``fwd_block_n``
       blocks; mode 1: v column-wise per ``colwise_chunk`` keys), all from key/query 0 of
       their own sequence.
    2. ``S = (q8 k8^T) * descales * alpha``, masked, ``P = silu(S)`` (exact).
    3. ``P`` quantized per ``fwd_p_rows`` delta rows (counted from the first delta row) x
       ``fwd_block_n`` keys (from key 0); mode 0 a saturating cast.
    4. ``O = sum_n (P8 @ v8[n]) * (s_P * v_descale[n]) / scaling_seqlen``.

    Args:
        delta_q: ``[L', H, Dqk]``.
        k: ``[L, H, Dqk]``.
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]`` offsets of ``k``/``v``.
        delta_offsets: ``[B + 1]`` offsets of ``delta_q``.
        max_seq_len: batch maximum of the full lengths.
        alpha: scale of ``q k^T``.
        options: mask options with ``fp8_quant_mode`` in 0..5.
        num_targets: optional ``[B]``.
        tile_sizes: kernel tiles (default: the SM90 kernel's for ``max(Dqk, Dv)``).

    Returns:
        ``[L', H, Dv]`` in the dtype of ``delta_q`` (no autograd graph).
    """
    mode = options.fp8_quant_mode
    check_fp8_quant_mode(mode)
    if is_tracing():
        raise ValueError(
            "fp8 delta attention (fp8_quant_mode >= 0) cannot be traced/exported; export the "
            "cached path with fp8_quant_mode=-1"
        )
    if tile_sizes is None:
        tile_sizes = FP8TileSizes.for_head_dim(max(delta_q.shape[-1], v.shape[-1]))
    total_queries, num_heads, _ = delta_q.shape
    total_keys, _, dim_v = v.shape
    scaling_seqlen = options.resolve_scaling_seqlen(max_seq_len)
    seq_offsets = seq_offsets.to(torch.int64)
    delta_offsets = delta_offsets.to(torch.int64)
    rows, bn, chunk = tile_sizes.fwd_p_rows, tile_sizes.fwd_block_n, tile_sizes.colwise_chunk
    with torch.no_grad():
        q_q = _PaddedOperand(quantize_for_mode(delta_q, delta_offsets, mode, tile_sizes.fwd_block_m, chunk=chunk))
        k_q = _PaddedOperand(quantize_for_mode(k, seq_offsets, mode, bn, chunk=chunk))
        v_q = _PaddedOperand(quantize_for_mode(v, seq_offsets, mode, bn, colwise=True, chunk=chunk))
        outputs = []
        for seq_ids, num_keys, num_queries in _delta_plan(seq_offsets, delta_offsets, max_seq_len, None):
            num_keys, num_queries = _round_up(num_keys, bn), _round_up(num_queries, rows)
            key_index, query_index, key_lengths, positions = _group_indices(
                seq_ids, seq_offsets, delta_offsets, num_keys, num_queries, total_keys, total_queries
            )
            mask = _group_mask(options, key_lengths, num_keys, num_targets, seq_ids, positions).unsqueeze(1)
            b = key_index.shape[0]
            s = _scores(
                q_q.values_at(query_index),
                k_q.values_at(key_index),
                q_q.descale_at(query_index),
                k_q.descale_at(key_index),
                alpha,
            )
            p = torch.where(mask, _silu(s), 0.0)
            p8, p_scale = quantize_tiles(p, rows, bn, scaled=mode != 0)
            tiles_n = num_keys // bn
            v8 = v_q.values_at(key_index).reshape(b, num_heads, tiles_n, bn, dim_v)
            partial = torch.einsum(
                "bhmtk,bhtkd->bhmtd", p8.double().reshape(b, num_heads, num_queries, tiles_n, bn), v8
            ).float()
            v_descale = v_q.descale_at(key_index)[:, :, ::bn]  # [b, H, tiles_n, Dv or 1]
            scale = p_scale.repeat_interleave(rows, dim=2).unsqueeze(-1) * v_descale.unsqueeze(2)
            outputs.append((query_index, (partial * scale).sum(dim=3) / scaling_seqlen))
        out = _scatter_rows(outputs, total_queries, num_heads, dim_v, delta_q.device)
    return out.to(delta_q.dtype)
