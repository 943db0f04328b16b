"""Torch-native jagged tensor helpers.

A jagged batch of ``B`` sequences is stored as ``values: [L, *D]`` (all tokens of all
sequences, back to back) plus ``offsets: [B + 1]`` (``offsets[b]`` is where sequence ``b``
starts, ``offsets[-1] == L``). These helpers convert between that layout, lengths and padded
dense tensors, and split/concatenate two jagged tensors per sequence.

They use only ``torch`` operators (no fbgemm), so they run on CPU and CUDA alike, keep
autograd, and trace under ``torch.export``: none of them reads a tensor value on the host.
"""

from typing import Optional, Tuple, cast

import torch


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sum of ``lengths: [B]`` -> ``offsets: [B + 1]`` (int64)."""
    lengths = lengths.to(torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, dim=0)])


def offsets_to_lengths(offsets: torch.Tensor) -> torch.Tensor:
    """``offsets: [B + 1]`` -> ``lengths: [B]`` (same dtype)."""
    return offsets[1:] - offsets[:-1]


def jagged_token_batch_ids(offsets: torch.Tensor, total_len: int) -> torch.Tensor:
    """Which sequence each token belongs to: ``[L]`` int64, ``L = total_len``.

    ``offsets`` follow the library's convention (start at 0, non-decreasing; see
    ``check_seq_offsets``).

    ``searchsorted`` keeps the output size static (``total_len``), which is what makes this
    traceable; ``repeat_interleave`` would need the lengths on the host.
    """
    tokens = torch.arange(total_len, device=offsets.device, dtype=offsets.dtype)
    # Searching the whole ``offsets`` (offsets[0] == 0 <= every token) and subtracting one,
    # rather than searching the view ``offsets[1:]``: inductor's CUDA lowering of searchsorted
    # on torch 2.11 drops the view's storage offset, so compiled and AOTInductor programs read
    # ``offsets[:-1]`` and hand the last sequence's tokens the batch index B (seen on an H100 as
    # a device-side "index out of bounds" assert; tests/ops/test_jagged.py).
    return torch.searchsorted(offsets, tokens, right=True) - 1


def jagged_token_positions(
    offsets: torch.Tensor, total_len: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per token: ``(batch_ids [L], positions [L])``, position counted from its sequence start."""
    batch_ids = jagged_token_batch_ids(offsets, total_len)
    tokens = torch.arange(total_len, device=offsets.device, dtype=offsets.dtype)
    return batch_ids, tokens - offsets[batch_ids]


def padded_gather_index(
    offsets: torch.Tensor, max_len: int, total_len: int
) -> torch.Tensor:
    """Index ``[B, max_len]`` into values padded by one extra row: slot ``(b, i)`` holds
    ``offsets[b] + i`` for ``i < length_b`` and ``total_len`` (the extra padding row) otherwise.
    """
    return gather_index_from_starts(
        offsets[:-1], offsets[1:] - offsets[:-1], max_len, total_len
    )


def gather_index_from_starts(
    starts: torch.Tensor, lengths: torch.Tensor, max_len: int, pad_index: int
) -> torch.Tensor:
    """Index ``[b, max_len]`` of the tokens of ``b`` sequences given by ``starts: [b]`` and
    ``lengths: [b]`` (any subset of a jagged batch): ``starts[s] + i`` for ``i < lengths[s]``,
    ``pad_index`` for the padded slots. Sequences longer than ``max_len`` are cut.
    """
    positions = torch.arange(max_len, device=starts.device, dtype=torch.int64).unsqueeze(0)
    index = starts.to(torch.int64).unsqueeze(1) + positions
    in_sequence = positions < lengths.to(torch.int64).unsqueeze(1)
    return torch.where(in_sequence, index, torch.full_like(index, pad_index))


def jagged_to_padded_dense(
    values: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    padding_value: float = 0.0,
) -> torch.Tensor:
    """Jagged ``values: [L, *D]`` -> padded ``[B, max_len, *D]``.

    Sequences longer than ``max_len`` are truncated to their first ``max_len`` tokens.

    Args:
        values: jagged values ``[L, *D]``.
        offsets: ``[B + 1]`` sequence offsets.
        max_len: padded length ``N``.
        padding_value: value of the padded slots.

    Returns:
        ``[B, N, *D]`` tensor.

    Example::

        >>> v = torch.arange(3.0).unsqueeze(1)
        >>> jagged_to_padded_dense(v, torch.tensor([0, 2, 3]), 2).squeeze(-1)
        tensor([[0., 1.],
                [2., 0.]])
    """
    total_len = values.shape[0]
    pad_row = values.new_full((1,) + tuple(values.shape[1:]), padding_value)
    padded_values = torch.cat([values, pad_row], dim=0)
    index = padded_gather_index(offsets, max_len, total_len)
    return padded_values[index]


def _total(offsets: torch.Tensor, total_len: Optional[int]) -> int:
    # Reading offsets[-1] is a host sync (an unbacked size under torch.export); callers on
    # hot paths pass the total when they know it.
    return cast(int, offsets[-1].item()) if total_len is None else total_len


def dense_to_jagged(
    dense: torch.Tensor, offsets: torch.Tensor, total_len: Optional[int] = None
) -> torch.Tensor:
    """Padded ``dense: [B, N, *D]`` -> jagged ``[L, *D]`` (the first ``length_b`` rows of each ``b``).

    Args:
        dense: ``[B, N, *D]``; every length must be ``<= N``.
        offsets: ``[B + 1]`` offsets of the jagged result.
        total_len: ``L``; pass it to avoid a host sync (required under ``torch.export``).

    Returns:
        ``[L, *D]``.
    """
    max_len = dense.shape[1]
    batch_ids, positions = jagged_token_positions(offsets, _total(offsets, total_len))
    flat = dense.reshape((dense.shape[0] * max_len,) + tuple(dense.shape[2:]))
    return flat[batch_ids * max_len + positions]


def split_2D_jagged(
    values: torch.Tensor,
    offsets_left: torch.Tensor,
    offsets_right: torch.Tensor,
    total_left: Optional[int] = None,
    total_right: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split each sequence of ``values`` into its first ``len_left[b]`` tokens and the
    remaining ``len_right[b]`` tokens.

    Args:
        values: ``[L_left + L_right, *D]``, per-sequence lengths ``len_left + len_right``.
        offsets_left: ``[B + 1]`` offsets of the left parts.
        offsets_right: ``[B + 1]`` offsets of the right parts.
        total_left: ``L_left`` (optional; avoids a host sync).
        total_right: ``L_right`` (optional; avoids a host sync).

    Returns:
        ``(left [L_left, *D], right [L_right, *D])``.
    """
    total_left = _total(offsets_left, total_left)
    total_right = _total(offsets_right, total_right)
    left_batch, left_pos = jagged_token_positions(offsets_left, total_left)
    right_batch, right_pos = jagged_token_positions(offsets_right, total_right)
    offsets = offsets_left + offsets_right
    len_left = offsets_left[1:] - offsets_left[:-1]
    left_index = offsets[left_batch] + left_pos
    right_index = offsets[right_batch] + len_left[right_batch] + right_pos
    return values[left_index], values[right_index]


def concat_2D_jagged(
    values_left: torch.Tensor,
    values_right: torch.Tensor,
    offsets_left: torch.Tensor,
    offsets_right: torch.Tensor,
) -> torch.Tensor:
    """Per sequence, ``[left_b | right_b]``: the inverse of :func:`split_2D_jagged`.

    Args:
        values_left: ``[L_left, *D]``.
        values_right: ``[L_right, *D]``.
        offsets_left: ``[B + 1]``.
        offsets_right: ``[B + 1]``.

    Returns:
        ``[L_left + L_right, *D]`` with offsets ``offsets_left + offsets_right``.
    """
    total_left, total_right = values_left.shape[0], values_right.shape[0]
    offsets = offsets_left + offsets_right
    left_batch, left_pos = jagged_token_positions(offsets_left, total_left)
    right_batch, right_pos = jagged_token_positions(offsets_right, total_right)
    len_left = offsets_left[1:] - offsets_left[:-1]
    dest_left = offsets[left_batch] + left_pos
    dest_right = offsets[right_batch] + len_left[right_batch] + right_pos
    dest = torch.cat([dest_left, dest_right])
    # A permutation: index_select with its inverse keeps autograd simple and deterministic.
    inverse = torch.empty_like(dest)
    inverse[dest] = torch.arange(dest.numel(), device=dest.device, dtype=dest.dtype)
    return torch.cat([values_left, values_right], dim=0)[inverse]
