"""Mid-stack attention truncation (ULTRA-HSTU): drop the oldest history tokens.

Layout of every sequence: ``[contextual C | history U_b | targets T_b]``. Truncation keeps the
contextual prefix, all targets and the last ``tail_len`` history tokens; the dropped tokens are
the oldest history tokens right after the prefix. The plan is computed once from the offsets
and replayed on every jagged tensor of the batch (embeddings, timestamps).
"""

import dataclasses
from typing import Optional

import torch

from torchrec_hstu.ops.common import is_tracing
from torchrec_hstu.ops.jagged import jagged_token_positions, lengths_to_offsets


@dataclasses.dataclass(frozen=True)
class TruncationPlan:
    """How to map a batch to its truncated form.

    Attributes:
        new_offsets: ``[B + 1]`` offsets after truncation.
        new_max_seq_len: longest sequence after truncation (int; the exact maximum, also
            under tracing, so ``scaling_seqlen=-1`` divides by the same value in eager and
            exported models).
        keep_index: ``[L_new]`` index of the kept tokens in the old values.
        dropped: ``[B]`` tokens dropped per sequence.
    """

    new_offsets: torch.Tensor
    new_max_seq_len: int
    keep_index: torch.Tensor
    dropped: torch.Tensor

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """Replay the plan on jagged ``values: [L, *D]`` -> ``[L_new, *D]``."""
        return values[self.keep_index]


def compute_truncation_plan(
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    tail_len: int,
    contextual_seq_len: int = 0,
    max_seq_len: Optional[int] = None,
) -> TruncationPlan:
    """Plan keeping at most ``tail_len`` history tokens per sequence.

    Args:
        seq_offsets: ``[B + 1]`` offsets.
        num_targets: optional ``[B]`` (``None``: the whole sequence after the prefix is history).
        tail_len: history tokens kept (the most recent ones).
        contextual_seq_len: contextual prefix length ``C`` (kept).
        max_seq_len: the batch max length before truncation (optional); under tracing it
            bounds the (symbolic) new maximum for the compiler.

    Returns:
        :class:`TruncationPlan`.
    """
    if tail_len < 0 or contextual_seq_len < 0:
        raise ValueError(
            f"tail_len and contextual_seq_len must be >= 0; got {tail_len}, {contextual_seq_len}"
        )
    seq_offsets = seq_offsets.to(torch.int64)
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    targets = torch.zeros_like(lengths) if num_targets is None else num_targets.to(torch.int64)
    history = torch.clamp(lengths - contextual_seq_len - targets, min=0)
    dropped = history - torch.clamp(history, max=tail_len)
    new_lengths = lengths - dropped
    new_offsets = lengths_to_offsets(new_lengths)
    if is_tracing():
        # Data-dependent sizes stay symbolic (unbacked) under torch.export.
        total_new = new_offsets[-1].item()
        torch._check(total_new >= 0)
        new_max_seq_len = new_lengths.max().item()
        torch._check(new_max_seq_len >= 0)
        if max_seq_len is not None:
            torch._check(new_max_seq_len <= max_seq_len)
    else:
        total_new = int(new_offsets[-1])
        new_max_seq_len = int(new_lengths.max()) if new_lengths.numel() > 0 else 0
    batch_ids, new_positions = jagged_token_positions(new_offsets, total_new)
    skip = torch.where(new_positions >= contextual_seq_len, dropped[batch_ids], 0)
    keep_index = seq_offsets[batch_ids] + new_positions + skip
    return TruncationPlan(
        new_offsets=new_offsets,
        new_max_seq_len=new_max_seq_len,
        keep_index=keep_index,
        dropped=dropped,
    )
