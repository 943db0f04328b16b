"""Ranking batches from an impression log: per-channel histories plus appended candidates.

A ranking sample is one user: their history impressions (per *channel*, e.g. every impression
or only the clicked ones) and ``C`` candidate impressions whose click / long-view labels are
the targets. Channels follow TorchEasyRec's Mixture of Transducers: each channel is its own
history sequence; candidates are shared.

The batch is plain tensors in ``KeyedJaggedTensor`` key-major order: the histories of channel
0 for every user, then channel 1, and so on (``history_lengths: [num_channels * B]``).
"""

import dataclasses
from typing import Dict, Iterator, Optional, Sequence

import torch

from torchrec_hstu.data.synthetic import CLICK, LONG_VIEW, Impressions

#: History channels by name: which history impressions each channel keeps (an action bitmask
#: filter; 0 keeps every impression). ``clicks`` / ``views`` match
#: ``examples/configs/ranking_two_channel.pbtxt`` (views = long views).
CHANNEL_ACTION_FILTERS: Dict[str, int] = {
    "uih": 0,
    "impressions": 0,
    "clicks": CLICK,
    "uih_click": CLICK,
    "views": LONG_VIEW,
    "long_views": LONG_VIEW,
    "uih_view": LONG_VIEW,
}

#: Default tasks: name -> action bit of its label.
DEFAULT_TASKS: Dict[str, int] = {"click": CLICK, "long_view": LONG_VIEW}


@dataclasses.dataclass
class RankingBatch:
    """Plain-tensor inputs of :class:`~torchrec_hstu.models.ranking.HSTURanking`.

    ``B`` users, ``K`` channels, ``Lh`` history tokens over all channels, ``T`` candidates.

    Attributes:
        history_ids: ``[Lh]`` int64, channel-major then user.
        history_lengths: ``[K * B]`` int64.
        history_timestamps: ``[Lh]`` int64.
        history_actions: ``[Lh]`` int64 action bitmasks.
        candidate_ids: ``[T]`` int64.
        num_targets: ``[B]`` int64 candidates per user.
        candidate_timestamps: ``[T]`` int64.
        candidate_actions: ``[T]`` int64 action bitmasks (the labels; never a model input).
        max_seq_len: longest ``history + candidates`` over channels and users.
        users: ``[B]`` rows of the impression log.
    """

    history_ids: torch.Tensor
    history_lengths: torch.Tensor
    history_timestamps: torch.Tensor
    history_actions: torch.Tensor
    candidate_ids: torch.Tensor
    num_targets: torch.Tensor
    candidate_timestamps: torch.Tensor
    candidate_actions: torch.Tensor
    max_seq_len: int
    users: torch.Tensor

    def labels(self, task_bitmasks: Sequence[int]) -> torch.Tensor:
        """``[T, num_tasks]`` float: ``(candidate_actions & bitmask) > 0`` per task."""
        masks = torch.tensor(list(task_bitmasks), dtype=torch.int64)
        return ((self.candidate_actions.unsqueeze(1) & masks) > 0).float()

    def model_inputs(self) -> Dict[str, object]:
        """Keyword arguments of ``HSTURanking.forward``."""
        return dict(
            history_ids=self.history_ids,
            history_lengths=self.history_lengths,
            history_timestamps=self.history_timestamps,
            history_actions=self.history_actions,
            candidate_ids=self.candidate_ids,
            num_targets=self.num_targets,
            candidate_timestamps=self.candidate_timestamps,
        )


def make_ranking_batch(
    log: Impressions,
    users: torch.Tensor,
    channels: Sequence[str],
    max_history_len: Optional[int] = None,
) -> RankingBatch:
    """Build a :class:`RankingBatch` for ``users``.

    Args:
        log: the impression log.
        users: ``[B]`` rows.
        channels: channel names from :data:`CHANNEL_ACTION_FILTERS`.
        max_history_len: keep at most this many latest history impressions per channel.

    Returns:
        :class:`RankingBatch`.
    """
    unknown = [c for c in channels if c not in CHANNEL_ACTION_FILTERS]
    if unknown or not channels:
        raise ValueError(
            f"channels must be a non-empty subset of {sorted(CHANNEL_ACTION_FILTERS)}; got {list(channels)}"
        )
    users = users.to(torch.int64)
    h = log.history_len
    ids, times, actions = log.item_ids[users], log.timestamps[users], log.actions[users]
    values, stamps, acts, lengths = [], [], [], []
    for channel in channels:
        bits = CHANNEL_ACTION_FILTERS[channel]
        keep = torch.ones_like(ids[:, :h], dtype=torch.bool) if bits == 0 else (actions[:, :h] & bits) > 0
        if max_history_len is not None:
            # Keep only the latest max_history_len kept impressions: count kept ones from the end.
            from_end = torch.flip(torch.cumsum(torch.flip(keep.to(torch.int64), [1]), 1), [1])
            keep = keep & (from_end <= max_history_len)
        values.append(ids[:, :h][keep])
        stamps.append(times[:, :h][keep])
        acts.append(actions[:, :h][keep])
        lengths.append(keep.sum(1))
    num_targets = torch.full((users.numel(),), log.num_candidates, dtype=torch.int64)
    history_lengths = torch.cat(lengths)
    longest = int(torch.stack(lengths).max()) if users.numel() > 0 else 0
    return RankingBatch(
        history_ids=torch.cat(values),
        history_lengths=history_lengths,
        history_timestamps=torch.cat(stamps),
        history_actions=torch.cat(acts),
        candidate_ids=ids[:, h:].reshape(-1),
        num_targets=num_targets,
        candidate_timestamps=times[:, h:].reshape(-1),
        candidate_actions=actions[:, h:].reshape(-1),
        max_seq_len=max(longest + log.num_candidates, 1),
        users=users,
    )


def iterate_ranking_batches(
    log: Impressions,
    users: torch.Tensor,
    batch_size: int,
    channels: Sequence[str],
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
    max_history_len: Optional[int] = None,
) -> Iterator[RankingBatch]:
    """Batches of :func:`make_ranking_batch` over ``users`` (optionally shuffled)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    rows = users.to(torch.int64)
    if shuffle:
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
    for start in range(0, rows.numel(), batch_size):
        yield make_ranking_batch(log, rows[start : start + batch_size], channels, max_history_len)


def split_users(num_users: int, eval_fraction: float, seed: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """Disjoint ``(train_users, eval_users)``, a seeded random split."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
    perm = torch.randperm(num_users, generator=torch.Generator().manual_seed(seed))
    n_eval = max(1, int(round(num_users * eval_fraction)))
    return perm[n_eval:].sort().values, perm[:n_eval].sort().values
