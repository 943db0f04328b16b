"""HSTU attention masks as pure functions of sequence lengths.

Two rules exist (notes decision 2):

* the fixed rule of generative-recommenders (:func:`hstu_attention_mask`): positions are
  remapped to ids (contextual prefix -> id 0, all targets share one id), then causal /
  target / window / contextual rules compare ids;
* Semi-Local Attention of ULTRA-HSTU (:func:`sla_attention_mask`): a history token at
  position ``p`` sees keys ``j <= p`` with ``j < max(sla_k2, contextual_seq_len)`` or
  ``j >= p - sla_k1 + 1``; a target sees all history and neither other targets nor itself.

Both return boolean masks ``[B, Nq, Nk]``; keys at or beyond a sequence's length are never
valid. The PyTorch reference uses them directly; kernels compute the same predicates per tile.
"""

from typing import Optional

import torch


def _default_positions(
    seq_lengths: torch.Tensor, num_positions: int, query_positions: Optional[torch.Tensor]
) -> torch.Tensor:
    if query_positions is not None:
        return query_positions.to(torch.int64)
    return torch.arange(num_positions, device=seq_lengths.device).unsqueeze(0)


def hstu_attention_mask(
    seq_lengths: torch.Tensor,
    max_seq_len: int,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    max_attn_len: int = 0,
    contextual_seq_len: int = 0,
    min_full_attn_seq_len: int = 0,
    query_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The generative-recommenders HSTU mask.

    Symbols: ``n`` sequence length, ``T`` its number of targets, ``c`` the contextual prefix,
    ``W`` ``max_attn_len``, ``M`` ``min_full_attn_seq_len``. Position ``i`` maps to
    ``id(i) = max(i - c + 1, 0)`` if ``c > 0`` else ``i``, clamped at
    ``maxid = n (- c + 1) - T`` when ``num_targets`` is given. Then::

        valid(i, j) = [(i == j or id_i > id_j)                     # |id_i - id_j| > 0 if not causal
                       and (W == 0 or id_i - id_j <= W or (M > 0 and id_i >= maxid - M))]
                      or [c > 0 and id_i == 0 and id_j < maxid]
                      and j < n

    Args:
        seq_lengths: ``[B]`` lengths.
        max_seq_len: ``Nk``, number of key positions (and query positions by default).
        causal: causal rule (else symmetric).
        num_targets: optional ``[B]`` number of trailing target tokens.
        max_attn_len: window ``W`` (0: none).
        contextual_seq_len: contextual prefix length ``c``.
        min_full_attn_seq_len: the last ``M`` history ids are exempt from the window.
        query_positions: optional ``[B or 1, Nq]`` positions of the query rows (default
            ``arange(Nk)``); used by incremental (delta) attention.

    Returns:
        ``[B, Nq, Nk]`` bool.
    """
    device = seq_lengths.device
    lengths = seq_lengths.to(torch.int64).view(-1, 1)
    rows = _default_positions(seq_lengths, max_seq_len, query_positions)
    cols = torch.arange(max_seq_len, device=device).unsqueeze(0)
    if contextual_seq_len > 0:
        row_ids = torch.clamp(rows - contextual_seq_len + 1, min=0)
        col_ids = torch.clamp(cols - contextual_seq_len + 1, min=0)
        max_ids = lengths - contextual_seq_len + 1
    else:
        row_ids, col_ids, max_ids = rows, cols, lengths
    if num_targets is not None:
        max_ids = max_ids - num_targets.to(torch.int64).view(-1, 1)
        row_ids = torch.minimum(row_ids, max_ids)
        col_ids = torch.minimum(col_ids, max_ids)
    row_ids = row_ids.unsqueeze(-1)  # [B|1, Nq, 1]
    col_ids = col_ids.unsqueeze(-2)  # [B|1, 1, Nk]
    dist = row_ids - col_ids
    if not causal:
        dist = dist.abs()
    diagonal = rows.unsqueeze(-1) == cols.unsqueeze(-2)
    valid = diagonal | (dist > 0)
    if max_attn_len > 0:
        in_window = dist <= max_attn_len
        if min_full_attn_seq_len > 0:
            in_window = in_window | (row_ids >= max_ids.unsqueeze(-1) - min_full_attn_seq_len)
        valid = valid & in_window
    if contextual_seq_len > 0:
        valid = valid | ((row_ids == 0) & (col_ids < max_ids.unsqueeze(-1)))
    key_in_sequence = cols.unsqueeze(-2) < lengths.unsqueeze(-1)
    return valid & key_in_sequence


def sla_attention_mask(
    seq_lengths: torch.Tensor,
    max_seq_len: int,
    sla_k1: int,
    sla_k2: int,
    num_targets: Optional[torch.Tensor] = None,
    contextual_seq_len: int = 0,
    query_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ULTRA-HSTU Semi-Local Attention mask.

    With ``K2 = max(sla_k2, contextual_seq_len)`` and ``H_b = n_b - T_b`` (the history end),
    a history query at position ``p < H_b`` sees keys ``j <= p`` with ``j < K2`` (global
    prefix) or ``j >= p - sla_k1 + 1`` (local window); a target query (``p >= H_b``) sees
    exactly the history ``[0, H_b)``: not other targets, not itself.

    Args:
        seq_lengths: ``[B]`` lengths.
        max_seq_len: ``Nk``.
        sla_k1: local causal window size (0: no local part).
        sla_k2: global prefix length (0: none beyond the contextual prefix).
        num_targets: optional ``[B]`` trailing targets.
        contextual_seq_len: contextual prefix length.
        query_positions: optional ``[B or 1, Nq]`` query positions (default ``arange(Nk)``).

    Returns:
        ``[B, Nq, Nk]`` bool.
    """
    if sla_k1 < 0 or sla_k2 < 0 or contextual_seq_len < 0:
        raise ValueError(
            f"sla_k1, sla_k2 and contextual_seq_len must be >= 0; got {sla_k1}, {sla_k2}, "
            f"{contextual_seq_len}"
        )
    device = seq_lengths.device
    lengths = seq_lengths.to(torch.int64).view(-1, 1)
    history_end = lengths
    if num_targets is not None:
        history_end = torch.clamp(lengths - num_targets.to(torch.int64).view(-1, 1), min=0)
    global_prefix = max(sla_k2, contextual_seq_len)
    rows = _default_positions(seq_lengths, max_seq_len, query_positions).unsqueeze(-1)
    cols = torch.arange(max_seq_len, device=device).view(1, 1, -1)
    history_end = history_end.unsqueeze(-1)
    causal = cols <= rows
    local_or_global = (cols < global_prefix) | (cols >= rows - sla_k1 + 1)
    history_rule = causal & local_or_global
    target_rule = cols < history_end
    is_target_row = rows >= history_end
    valid = torch.where(is_target_row, target_rule, history_rule)
    return valid & (cols < lengths.unsqueeze(-1))
