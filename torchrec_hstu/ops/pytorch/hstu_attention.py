"""PyTorch reference of jagged HSTU attention (any device, float16/bfloat16/float32/float64).

Math (notes decision 1), per sequence and head::

    O = (silu(alpha * Q K^T) / scaling_seqlen * mask) @ V

No softmax. The reference is also what trains on CPU, so it does not pay for padding:
sequences are grouped by length (longest first, a group closes when the next sequence is
shorter than ``GROUP_LENGTH_RATIO`` of its longest) and each group is padded only to its own
longest sequence. Under tracing (torch.export / compile) there is one group padded to
``max_seq_len + 1``, which needs no host sync.

Half-precision inputs are computed in float32 and cast back, float64 stays float64, so the
reference doubles as a test oracle for the fast kernels. One autograd node covers all groups and
keeps only the scores for backward (see :class:`_JaggedAttention`).
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from torchrec_hstu.ops.common import AttentionOptions, is_tracing
from torchrec_hstu.ops.jagged import gather_index_from_starts
from torchrec_hstu.ops.masks import hstu_attention_mask, sla_attention_mask

#: A group closes when the next (shorter) sequence is below this fraction of its longest.
GROUP_LENGTH_RATIO = 0.75
#: Upper bound on ``sequences * N * N`` per group, which bounds the score tensors' memory.
GROUP_MAX_SCORE_ELEMENTS = 1 << 24


def group_sequences_by_length(
    lengths: List[int],
    ratio: Optional[float] = None,
    max_score_elements: Optional[int] = None,
) -> List[Tuple[List[int], int]]:
    """Partition sequence indices into ``(indices, padded_len)`` groups.

    Sequences are taken longest first; a group closes when the next sequence is shorter than
    ``ratio`` times the group's longest, or when ``sequences * padded_len^2`` would exceed
    ``max_score_elements``. Empty sequences are left out (they produce no output).

    Args:
        lengths: ``B`` sequence lengths.
        ratio: default :data:`GROUP_LENGTH_RATIO` (read at call time).
        max_score_elements: default :data:`GROUP_MAX_SCORE_ELEMENTS` (read at call time).

    Returns:
        ``[(sequence indices, padded_len), ...]``, every non-empty sequence in exactly one group.
    """
    ratio = GROUP_LENGTH_RATIO if ratio is None else ratio
    max_score_elements = GROUP_MAX_SCORE_ELEMENTS if max_score_elements is None else max_score_elements
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
    return gather_index_from_starts(starts, lengths, padded_len, pad_index)


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
        # One spare (always masked) slot keeps the padded length >= 2 when max_seq_len is a
        # symbolic size that may be 1: inductor's bmm lowering cannot guard on ``N == 1``.
        groups = [(torch.arange(batch_size, device=seq_offsets.device), max_seq_len + 1)]
    else:
        lengths = (seq_offsets[1:] - seq_offsets[:-1]).tolist()
        groups = [
            (torch.tensor(indices, device=seq_offsets.device), padded_len)
            for indices, padded_len in group_sequences_by_length(lengths)
        ]
    if cache is not None:
        cache["groups"] = groups
    return groups


class _JaggedAttention(torch.autograd.Function):
    """Reference attention over all length groups as one autograd node.

    Per group (``index: [b, N]`` token rows with padded slots = ``L``, ``masked_out: [b, 1, N, N]``
    bool, True where the mask is off; ``keep: [b, H, N, N]`` bool dropout mask or None)::

        S = (alpha Q) K^T;  O = (silu(S) * mask [* keep]) @ V * out_scale

    Backward keeps only the caller's ``q, k, v`` (alive anyway) and each group's scores ``S``;
    the padded group tensors are gathered again, ``silu`` and the weights are recomputed, the
    scalar factors are applied to the small ``[N, D]`` operands and ``silu'`` is built in place.
    So fwd+bwd holds about three ``N x N`` tensors of one group at a time plus one (``S``) per
    group, where autograd of the same expression keeps four per group plus padded copies.
    """

    @staticmethod
    def forward(ctx, q, k, v, groups, alpha: float, out_scale: float, compute_dtype):
        total_len, num_heads, _ = q.shape
        dim_v = v.shape[2]
        result = q.new_zeros((total_len + 1, num_heads, dim_v), dtype=compute_dtype)
        scores_per_group: List[torch.Tensor] = []
        # One head: 3-D [b, N, D] operands. A [b, 1, N, D] tensor is also channels-last
        # contiguous, and inductor then asks for the concrete strides of an unbacked N under
        # torch.export (GuardOnDataDependentSymNode); the math is the same.
        one_head = num_heads == 1
        for index, masked_out, keep in groups:
            if one_head:
                qg, kg, vg = (_gather_one_head(x, index, total_len, compute_dtype) for x in (q, k, v))
                masked_out = masked_out[:, 0]
                keep = None if keep is None else keep[:, 0]
            else:
                qg, kg, vg = (_gather(x, index, total_len, compute_dtype) for x in (q, k, v))
            scores = torch.matmul(qg.mul_(alpha), kg.transpose(-1, -2))
            weights = F.silu(scores)
            weights.masked_fill_(masked_out, 0.0)
            if keep is not None:
                weights.mul_(keep)
            out = torch.matmul(weights, vg)
            del weights
            out.mul_(out_scale)
            rows = out.reshape(-1, 1, dim_v) if one_head else out.transpose(1, 2).reshape(-1, num_heads, dim_v)
            # Padded slots all write the spare row L, which is dropped.
            result.index_copy_(0, index.reshape(-1), rows)
            scores_per_group.append(scores.unsqueeze(1) if one_head else scores)
        ctx.save_for_backward(q, k, v)
        ctx.groups, ctx.scores = groups, scores_per_group
        ctx.alpha, ctx.out_scale, ctx.compute_dtype = alpha, out_scale, compute_dtype
        return result[:total_len].to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        total_len, num_heads, dim_qk = q.shape
        dim_v = v.shape[2]
        dtype = ctx.compute_dtype
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        # Padded query rows read the zero row L: their outputs were dropped, so no gradient.
        grad_out = torch.cat([grad_out.to(dtype), grad_out.new_zeros((1, num_heads, dim_v), dtype=dtype)])
        grads = [
            q.new_zeros((total_len + 1, num_heads, dim), dtype=dtype) if needed else None
            for needed, dim in ((need_q, dim_qk), (need_k, dim_qk), (need_v, dim_v))
        ]
        for (index, masked_out, keep), scores in zip(ctx.groups, ctx.scores):
            flat_index = index.reshape(-1)
            qg, kg, vg = (_gather(x, index, total_len, dtype) for x in (q, k, v))
            grad_og = grad_out[index].transpose(1, 2).mul(ctx.out_scale).contiguous()  # [b, H, N, Dv]
            sig = torch.sigmoid(scores)
            if need_v:
                weights = scores * sig
                weights.masked_fill_(masked_out, 0.0)
                if keep is not None:
                    weights.mul_(keep)
                grad_vg = torch.matmul(weights.transpose(-1, -2), grad_og)
                del weights
                grads[2].index_copy_(0, flat_index, grad_vg.transpose(1, 2).reshape(-1, num_heads, dim_v))
            if need_q or need_k:
                grad_scores = torch.matmul(grad_og, vg.transpose(-1, -2))
                grad_scores.masked_fill_(masked_out, 0.0)
                if keep is not None:
                    grad_scores.mul_(keep)
                # silu'(s) = sig * (1 + s * (1 - sig)), applied in two in-place passes.
                grad_scores.mul_(sig)
                sig.neg_().add_(1.0).mul_(scores).add_(1.0)
                grad_scores.mul_(sig)
                del sig
                if need_q:
                    grad_qg = torch.matmul(grad_scores, kg).mul_(ctx.alpha)
                    grads[0].index_copy_(0, flat_index, grad_qg.transpose(1, 2).reshape(-1, num_heads, dim_qk))
                if need_k:
                    grad_kg = torch.matmul(grad_scores.transpose(-1, -2), qg).mul_(ctx.alpha)
                    grads[1].index_copy_(0, flat_index, grad_kg.transpose(1, 2).reshape(-1, num_heads, dim_qk))
        grad_q, grad_k, grad_v = (
            None if g is None else g[:total_len].to(x.dtype) for g, x in zip(grads, (q, k, v))
        )
        return grad_q, grad_k, grad_v, None, None, None, None


def _gather(x: torch.Tensor, index: torch.Tensor, total_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``index: [b, N]`` of jagged ``x: [L, H, D]`` as contiguous ``[b, H, N, D]`` in ``dtype``
    (a new tensor: callers may modify it in place).

    Padded slots (``index == L``) read row 0; callers mask them (keys) or drop them (queries).
    """
    read_index = torch.where(index < total_len, index, torch.zeros_like(index))
    return x[read_index].transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)


def _gather_one_head(x: torch.Tensor, index: torch.Tensor, total_len: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_gather` of a one-head ``x: [L, 1, D]`` as ``[b, N, D]``."""
    read_index = torch.where(index < total_len, index, torch.zeros_like(index))
    return x[:, 0][read_index].to(dtype, memory_format=torch.contiguous_format)


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
    cache: Optional[Dict[Any, Any]] = None,  # keys: "groups" and ("mask", ...) tuples
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
    if options.use_fp8:
        raise ValueError(
            "pytorch_hstu_attention computes in high precision; fp8_quant_mode="
            f"{options.fp8_quant_mode} goes through hstu_attention (FP8 emulation)"
        )
    total_len, num_heads, _ = q.shape
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scaling_seqlen = options.resolve_scaling_seqlen(max_seq_len)
    dropout_on = dropout_pr > 0.0 and training
    out_scale = 1.0 / scaling_seqlen
    if dropout_on:
        out_scale = out_scale / (1.0 - dropout_pr)
    seq_offsets = seq_offsets.to(torch.int64)
    seq_lengths = seq_offsets[1:] - seq_offsets[:-1]
    starts = seq_offsets[:-1]
    mask_key = ("mask",) + options.mask_signature(num_targets is not None)
    masks: Optional[List[torch.Tensor]] = None if cache is None else cache.get(mask_key)
    new_masks: List[torch.Tensor] = []
    groups = []
    for group_id, (seq_ids, padded_len) in enumerate(_attention_plan(seq_offsets, max_seq_len, cache)):
        group_lengths = seq_lengths[seq_ids]
        index = _gather_index(starts[seq_ids], group_lengths, padded_len, total_len)
        if masks is not None:
            mask = masks[group_id]
        else:
            group_targets = None if num_targets is None else num_targets.to(torch.int64)[seq_ids]
            # Stored inverted ([b, 1, N, N], True = masked out) for masked_fill_.
            mask = ~build_mask(options, group_lengths, padded_len, group_targets).unsqueeze(1)
            new_masks.append(mask)
        keep = None
        if dropout_on:
            shape = (index.shape[0], num_heads, padded_len, padded_len)
            keep = torch.rand(shape, device=q.device, dtype=compute_dtype) >= dropout_pr
        groups.append((index, mask, keep))
    if cache is not None and masks is None:
        cache[mask_key] = new_masks
    # The reference computes in compute_dtype whatever the caller's autocast says.
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _JaggedAttention.apply(q, k, v, groups, float(alpha), out_scale, compute_dtype)
