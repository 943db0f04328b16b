"""PyTorch reference of jagged HSTU attention (any device, float16/bfloat16/float32/float64).

Math (notes decision 1), per sequence and head::

    O = (silu(alpha * Q K^T) / scaling_seqlen * mask) @ V

No softmax. The reference is also what trains on CPU, so it does not pay for padding:
sequences are grouped by length (longest first, a group closes when the next sequence is
shorter than ``GROUP_LENGTH_RATIO`` of its longest) and each group is padded only to its own
longest sequence. Under tracing (torch.export / compile) there is one group padded to
``max_seq_len``, which needs no host sync.

Half-precision inputs are computed in float32 and cast back, float64 stays float64, so the
reference doubles as a test oracle for the fast kernels.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from torchrec_hstu.ops.common import AttentionOptions, is_tracing
from torchrec_hstu.ops.masks import hstu_attention_mask, sla_attention_mask

#: A group closes when the next (shorter) sequence is below this fraction of its longest.
GROUP_LENGTH_RATIO = 0.75
#: Upper bound on ``sequences * N * N`` per group, which bounds the score tensors' memory.
GROUP_MAX_SCORE_ELEMENTS = 1 << 24


def group_sequences_by_length(
    lengths: List[int],
    ratio: float = GROUP_LENGTH_RATIO,
    max_score_elements: int = GROUP_MAX_SCORE_ELEMENTS,
) -> List[Tuple[List[int], int]]:
    """Partition sequence indices into ``(indices, padded_len)`` groups; empty sequences are
    left out (they produce no output)."""
    order = sorted((b for b, n in enumerate(lengths) if n > 0), key=lambda b: -lengths[b])
    groups: List[Tuple[List[int], int]] = []
    current: List[int] = []
    cap = 0
    for b in order:
        n = lengths[b]
        too_short = n < cap * ratio
        too_big = (len(current) + 1) * cap * cap > max_score_elements
        if current and (too_short or too_big):
            groups.append((current, cap))
            current = []
        if not current:
            cap = n
        current.append(b)
    if current:
        groups.append((current, cap))
    return groups


def _gather_index(
    starts: torch.Tensor, lengths: torch.Tensor, padded_len: int, pad_index: int
) -> torch.Tensor:
    positions = torch.arange(padded_len, device=starts.device)
    index = starts.unsqueeze(1) + positions.unsqueeze(0)
    return torch.where(
        positions.unsqueeze(0) < lengths.unsqueeze(1), index, torch.full_like(index, pad_index)
    )


def build_mask(
    options: AttentionOptions,
    seq_lengths: torch.Tensor,
    padded_len: int,
    num_targets: Optional[torch.Tensor],
    query_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The mask of ``options`` for sequences of ``seq_lengths`` padded to ``padded_len``."""
    if options.use_sla:
        return sla_attention_mask(
            seq_lengths,
            padded_len,
            sla_k1=options.sla_k1,
            sla_k2=options.sla_k2,
            num_targets=num_targets,
            contextual_seq_len=options.contextual_seq_len,
            query_positions=query_positions,
        )
    return hstu_attention_mask(
        seq_lengths,
        padded_len,
        causal=options.causal,
        num_targets=num_targets,
        max_attn_len=options.max_attn_len,
        contextual_seq_len=options.contextual_seq_len,
        min_full_attn_seq_len=options.min_full_attn_seq_len,
        query_positions=query_positions,
    )


def _attention_plan(
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    cache: Optional[Dict[str, Any]],
) -> List[Tuple[torch.Tensor, int]]:
    """Groups as ``(sequence index tensor, padded_len)``; cached per batch in ``cache``."""
    if cache is not None and "groups" in cache:
        return cache["groups"]
    batch_size = seq_offsets.numel() - 1
    if is_tracing():
        groups = [(torch.arange(batch_size, device=seq_offsets.device), max_seq_len)]
    else:
        lengths = (seq_offsets[1:] - seq_offsets[:-1]).tolist()
        groups = [
            (torch.tensor(indices, device=seq_offsets.device), padded_len)
            for indices, padded_len in group_sequences_by_length(lengths)
        ]
    if cache is not None:
        cache["groups"] = groups
    return groups


def pytorch_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
    dropout_pr: float = 0.0,
    training: bool = False,
    cache: Optional[Dict[str, Any]] = None,
) -> torch.Tensor:
    """Reference HSTU attention on jagged tensors.

    Args:
        q: ``[L, H, Dqk]``.
        k: ``[L, H, Dqk]``.
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]``.
        max_seq_len: batch maximum length ``N`` (the default ``scaling_seqlen``).
        alpha: scale of ``q k^T``.
        options: mask / numerics options (``fp8_quant_mode`` must be -1 here).
        num_targets: optional ``[B]``.
        dropout_pr: dropout on the attention weights when ``training``.
        training: apply dropout.
        cache: optional per-batch dict reused across layers that share ``seq_offsets``
            (length groups and masks are computed once).

    Returns:
        ``[L, H, Dv]`` in the dtype of ``q``.
    """
    total_len, num_heads, _ = q.shape
    dim_v = v.shape[2]
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scaling_seqlen = options.resolve_scaling_seqlen(max_seq_len)
    seq_offsets = seq_offsets.to(torch.int64)
    seq_lengths = seq_offsets[1:] - seq_offsets[:-1]
    starts = seq_offsets[:-1]

    # One zero row at index L serves every padded slot (silu(0) = 0 and v = 0 there).
    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.to(compute_dtype), x.new_zeros((1,) + tuple(x.shape[1:]), dtype=compute_dtype)])

    q_pad, k_pad, v_pad = pad(q), pad(k), pad(v)
    mask_key = ("mask",) + options.mask_signature(num_targets is not None)
    masks: Optional[List[torch.Tensor]] = None if cache is None else cache.get(mask_key)
    new_masks: List[torch.Tensor] = []

    out_indices: List[torch.Tensor] = []
    out_values: List[torch.Tensor] = []
    for group_id, (seq_ids, padded_len) in enumerate(_attention_plan(seq_offsets, max_seq_len, cache)):
        group_lengths = seq_lengths[seq_ids]
        index = _gather_index(starts[seq_ids], group_lengths, padded_len, total_len)
        # [b, N, H, D] -> [b, H, N, D]
        qg = q_pad[index].transpose(1, 2)
        kg = k_pad[index].transpose(1, 2)
        vg = v_pad[index].transpose(1, 2)
        if masks is not None:
            mask = masks[group_id]
        else:
            group_targets = None if num_targets is None else num_targets.to(torch.int64)[seq_ids]
            mask = build_mask(options, group_lengths, padded_len, group_targets)
            new_masks.append(mask)
        scores = alpha * torch.matmul(qg, kg.transpose(-1, -2))
        weights = F.silu(scores) / scaling_seqlen * mask.unsqueeze(1).to(compute_dtype)
        if dropout_pr > 0.0 and training:
            weights = F.dropout(weights, p=dropout_pr, training=True)
        out = torch.matmul(weights, vg).transpose(1, 2)  # [b, N, H, Dv]
        out_indices.append(index.reshape(-1))
        out_values.append(out.reshape(-1, num_heads, dim_v))
    if cache is not None and masks is None:
        cache[mask_key] = new_masks

    result = q.new_zeros((total_len + 1, num_heads, dim_v), dtype=compute_dtype)
    if out_indices:
        # Padded slots all write row L, which is dropped.
        result = result.index_copy(0, torch.cat(out_indices), torch.cat(out_values))
    return result[:total_len].to(q.dtype)
