"""Mid-stack attention truncation (ULTRA-HSTU): drop the oldest history tokens.

Layout of every sequence: ``[contextual C | history U_b | targets T_b]``. Truncation keeps the
contextual prefix, all targets and the last ``tail_len`` history tokens; the dropped tokens are
the oldest history tokens right after the prefix. The plan is computed once from the offsets
and replayed on every jagged tensor of the batch (embeddings, timestamps).

Host syncs: the new totals and maximum are computed in Python from the batch's
:class:`~torchrec_hstu.ops.common.JaggedBatchFacts` (read once at the model's edge), so
:func:`compute_truncation_plan` reads nothing from the device; under tracing they are unbacked
sizes. :func:`compute_truncation_plan_sync` reads the facts first (one host sync).
"""

import dataclasses
from typing import Optional, Sequence, Tuple, cast

import torch

from torchrec_hstu.ops.common import JaggedBatchFacts, check_jagged_batch_sync, is_tracing
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
        new_facts: the truncated batch's host facts (None while tracing); their
            ``max_seq_len`` is ``max(new_max_seq_len, 1)``.
    """

    new_offsets: torch.Tensor
    new_max_seq_len: int
    keep_index: torch.Tensor
    dropped: torch.Tensor
    new_facts: Optional[JaggedBatchFacts] = None

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """Replay the plan on jagged ``values: [L, *D]`` -> ``[L_new, *D]``."""
        return values[self.keep_index]


def truncated_lengths(
    lengths: Sequence[int],
    num_targets: Optional[Sequence[int]],
    tail_len: int,
    contextual_seq_len: int = 0,
) -> Tuple[int, ...]:
    """Per-sequence lengths after truncation, on the host (pure Python, no device read).

    Example::

        >>> truncated_lengths((9, 3), (2, 1), tail_len=4, contextual_seq_len=1)
        (7, 3)
    """
    targets = num_targets if num_targets is not None else (0,) * len(lengths)
    return tuple(
        n - max(max(n - contextual_seq_len - t, 0) - tail_len, 0) for n, t in zip(lengths, targets)
    )


def truncated_facts(
    facts: JaggedBatchFacts, tail_len: int, contextual_seq_len: int = 0
) -> JaggedBatchFacts:
    """The facts of the truncated batch (targets are kept; ``max_seq_len`` = the new longest, >= 1)."""
    lengths = truncated_lengths(facts.lengths, facts.num_targets, tail_len, contextual_seq_len)
    return JaggedBatchFacts(
        lengths=lengths, num_targets=facts.num_targets, max_seq_len=max(max(lengths, default=0), 1)
    )


def _check_sizes(tail_len: int, contextual_seq_len: int) -> None:
    if tail_len < 0 or contextual_seq_len < 0:
        raise ValueError(
            f"tail_len and contextual_seq_len must be >= 0; got {tail_len}, {contextual_seq_len}"
        )


def compute_truncation_plan(
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    tail_len: int,
    contextual_seq_len: int = 0,
    max_seq_len: Optional[int] = None,
    facts: Optional[JaggedBatchFacts] = None,
) -> TruncationPlan:
    """Plan keeping at most ``tail_len`` history tokens per sequence, without a host read.

    Args:
        seq_offsets: ``[B + 1]`` offsets.
        num_targets: optional ``[B]`` (``None``: the whole sequence after the prefix is history).
        tail_len: history tokens kept (the most recent ones).
        contextual_seq_len: contextual prefix length ``C`` (kept).
        max_seq_len: the batch max length before truncation (optional); under tracing it
            bounds the (symbolic) new maximum for the compiler.
        facts: the batch's host facts (from the edge check, with the same ``num_targets``);
            required unless tracing (use :func:`compute_truncation_plan_sync` to read them).

    Returns:
        :class:`TruncationPlan`.
    """
    _check_sizes(tail_len, contextual_seq_len)
    seq_offsets = seq_offsets.to(torch.int64)
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    targets = torch.zeros_like(lengths) if num_targets is None else num_targets.to(torch.int64)
    history = torch.clamp(lengths - contextual_seq_len - targets, min=0)
    dropped = history - torch.clamp(history, max=tail_len)
    new_lengths = lengths - dropped
    new_offsets = lengths_to_offsets(new_lengths)
    new_facts: Optional[JaggedBatchFacts] = None
    if facts is not None:
        if facts.batch_size != lengths.numel() or (facts.num_targets is None) != (num_targets is None):
            raise ValueError(
                f"facts describe {facts.batch_size} sequences "
                f"{'without' if facts.num_targets is None else 'with'} num_targets; the batch has "
                f"{lengths.numel()} {'without' if num_targets is None else 'with'}"
            )
        new_facts = truncated_facts(facts, tail_len, contextual_seq_len)
        total_new, new_max_seq_len = new_facts.total_len, new_facts.longest
    elif is_tracing():
        # Data-dependent sizes stay symbolic (unbacked) under torch.export.
        total_new = cast(int, new_offsets[-1].item())
        torch._check(total_new >= 0)
        new_max_seq_len = cast(int, new_lengths.max().item())
        torch._check(new_max_seq_len >= 0)
        if max_seq_len is not None:
            torch._check(new_max_seq_len <= max_seq_len)
    else:
        raise ValueError(
            "compute_truncation_plan needs the batch's facts (check_jagged_batch_sync at the model's "
            "edge) outside tracing; call compute_truncation_plan_sync to read them here"
        )
    batch_ids, new_positions = jagged_token_positions(new_offsets, total_new)
    skip = torch.where(new_positions >= contextual_seq_len, dropped[batch_ids], 0)
    keep_index = seq_offsets[batch_ids] + new_positions + skip
    return TruncationPlan(
        new_offsets=new_offsets,
        new_max_seq_len=new_max_seq_len,
        keep_index=keep_index,
        dropped=dropped,
        new_facts=new_facts,
    )


def compute_truncation_plan_sync(
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    tail_len: int,
    contextual_seq_len: int = 0,
    max_seq_len: Optional[int] = None,
) -> TruncationPlan:
    """:func:`compute_truncation_plan` after reading and checking the batch's facts (host
    syncs; none under tracing). For tests and callers without an edge check.

    Example::

        >>> plan = compute_truncation_plan_sync(torch.tensor([0, 6, 8]), torch.tensor([1, 1]), tail_len=2)
        >>> plan.new_offsets.tolist(), plan.new_max_seq_len
        ([0, 3, 5], 3)
    """
    _check_sizes(tail_len, contextual_seq_len)
    facts = None
    if not is_tracing():
        total_len = int(seq_offsets[-1]) if seq_offsets.numel() > 0 else 0
        facts = check_jagged_batch_sync(seq_offsets, total_len, max_seq_len, num_targets)
    return compute_truncation_plan(seq_offsets, num_targets, tail_len, contextual_seq_len, max_seq_len, facts)
