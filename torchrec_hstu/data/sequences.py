"""Per-user interaction sequences in jagged layout, the leave-last-out split and batching.

Symbols: ``U`` users, ``T`` interactions in total, ``B`` sequences in a batch, ``L`` tokens in
a batch. A :class:`SequenceDataset` stores every user's interactions back to back, sorted by
time within each user: ``item_ids: [T]``, ``timestamps: [T]`` and ``offsets: [U + 1]``.
"""

import dataclasses
from typing import Iterator, List, Optional, Tuple

import torch

from torchrec_hstu.ops.jagged import lengths_to_offsets


@dataclasses.dataclass
class SequenceDataset:
    """Interaction sequences of ``U`` users, each sorted by time.

    Attributes:
        item_ids: ``[T]`` int64 item ids in ``[0, num_items)``.
        timestamps: ``[T]`` int64 seconds, non-decreasing within each user.
        offsets: ``[U + 1]`` int64, user ``u`` owns ``[offsets[u], offsets[u + 1])``.
        num_items: catalogue size ``N``.
        item_vocab: raw item id of each contiguous id (real data), else None.
        user_vocab: raw user id of each user row (real data), else None.

    Example::

        >>> ds = SequenceDataset(
        ...     torch.tensor([0, 1, 2]), torch.tensor([5, 6, 1]), torch.tensor([0, 2, 3]), num_items=3)
        >>> ds.num_users, ds.lengths.tolist()
        (2, [2, 1])
    """

    item_ids: torch.Tensor
    timestamps: torch.Tensor
    offsets: torch.Tensor
    num_items: int
    item_vocab: Optional[List[str]] = None
    user_vocab: Optional[List[str]] = None

    def __post_init__(self) -> None:
        for name in ("item_ids", "timestamps", "offsets"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype != torch.int64:
                raise ValueError(f"{name} must be a 1-D int64 tensor; got {getattr(value, 'dtype', type(value))}")
        if self.timestamps.shape != self.item_ids.shape:
            raise ValueError(
                f"timestamps must have item_ids' shape [T]={tuple(self.item_ids.shape)}; "
                f"got {tuple(self.timestamps.shape)}"
            )
        if self.offsets.numel() < 1 or int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.item_ids.numel():
            raise ValueError(
                f"offsets must be [U + 1], start at 0 and end at T={self.item_ids.numel()}; "
                f"got {self.offsets.numel()} entries"
            )
        if bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")
        if self.num_items <= 0:
            raise ValueError(f"num_items must be > 0; got {self.num_items}")
        if self.item_ids.numel() > 0 and (
            int(self.item_ids.min()) < 0 or int(self.item_ids.max()) >= self.num_items
        ):
            raise ValueError(f"item_ids must lie in [0, num_items={self.num_items})")

    @property
    def num_users(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """``[U]`` int64 interactions per user."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_interactions(self) -> int:
        return self.item_ids.numel()

    def user(self, u: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(item_ids, timestamps)`` of user ``u``."""
        start, end = int(self.offsets[u]), int(self.offsets[u + 1])
        return self.item_ids[start:end], self.timestamps[start:end]

    def item_counts(self) -> torch.Tensor:
        """``[N]`` int64 number of interactions per item."""
        return torch.bincount(self.item_ids, minlength=self.num_items)


def _gather_tails(
    offsets: torch.Tensor, users: torch.Tensor, keep: torch.Tensor, drop_last: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token index ``[L]`` of the last ``keep[b]`` tokens of each user after dropping
    ``drop_last`` trailing tokens, and the kept lengths ``[B]``."""
    ends = offsets[users + 1] - drop_last
    starts = ends - keep
    out_offsets = lengths_to_offsets(keep)
    total = int(out_offsets[-1])
    shift = torch.repeat_interleave(starts - out_offsets[:-1], keep, output_size=total)
    return torch.arange(total, dtype=torch.int64) + shift, keep


@dataclasses.dataclass
class RetrievalSplit:
    """Leave-last-out split: train on each user's prefix, predict the held-out last item.

    Attributes:
        train: the prefixes (every user's sequence without its last item).
        test_targets: ``[U]`` the held-out last item of each user.
        test_timestamps: ``[U]`` its timestamp.
    """

    train: SequenceDataset
    test_targets: torch.Tensor
    test_timestamps: torch.Tensor


def leave_last_out(dataset: SequenceDataset, min_history: int = 1) -> RetrievalSplit:
    """Hold out each user's last interaction (the GR / SASRec protocol).

    Users with fewer than ``min_history + 1`` interactions are dropped.

    Args:
        dataset: the full sequences.
        min_history: minimum prefix length kept for a user.

    Returns:
        :class:`RetrievalSplit`; its ``train`` keeps ``item_vocab`` and the kept users' vocab.
    """
    if min_history < 1:
        raise ValueError(f"min_history must be >= 1; got {min_history}")
    lengths = dataset.lengths
    users = torch.nonzero(lengths >= min_history + 1).flatten()
    prefix_lengths = lengths[users] - 1
    index, _ = _gather_tails(dataset.offsets, users, prefix_lengths, drop_last=1)
    last = dataset.offsets[users + 1] - 1
    train = SequenceDataset(
        item_ids=dataset.item_ids[index],
        timestamps=dataset.timestamps[index],
        offsets=lengths_to_offsets(prefix_lengths),
        num_items=dataset.num_items,
        item_vocab=dataset.item_vocab,
        user_vocab=None if dataset.user_vocab is None else [dataset.user_vocab[u] for u in users.tolist()],
    )
    return RetrievalSplit(train, dataset.item_ids[last], dataset.timestamps[last])


@dataclasses.dataclass
class SequenceBatch:
    """A batch of (truncated) user sequences as plain tensors, ready for a model's ``forward``.

    Attributes:
        item_ids: ``[L]`` int64.
        lengths: ``[B]`` int64.
        timestamps: ``[L]`` int64.
        max_seq_len: ``max(lengths)`` (at least 1), computed here so models need no host sync.
        users: ``[B]`` int64 row of each sequence in its dataset.
    """

    item_ids: torch.Tensor
    lengths: torch.Tensor
    timestamps: torch.Tensor
    max_seq_len: int
    users: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.lengths.numel()

    @property
    def num_tokens(self) -> int:
        return self.item_ids.numel()


def make_batch(dataset: SequenceDataset, users: torch.Tensor, max_seq_len: int) -> SequenceBatch:
    """The most recent ``max_seq_len`` interactions of each of ``users``.

    Args:
        dataset: sequences.
        users: ``[B]`` int64 rows of ``dataset``.
        max_seq_len: truncation length (keeps the latest tokens).

    Returns:
        :class:`SequenceBatch`.
    """
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be > 0; got {max_seq_len}")
    users = users.to(torch.int64)
    keep = torch.clamp(dataset.lengths[users], max=max_seq_len)
    index, lengths = _gather_tails(dataset.offsets, users, keep)
    longest = int(lengths.max()) if lengths.numel() > 0 else 1
    return SequenceBatch(
        item_ids=dataset.item_ids[index],
        lengths=lengths,
        timestamps=dataset.timestamps[index],
        max_seq_len=max(longest, 1),
        users=users,
    )


def iterate_batches(
    dataset: SequenceDataset,
    batch_size: int,
    max_seq_len: int,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
    users: Optional[torch.Tensor] = None,
) -> Iterator[SequenceBatch]:
    """Batches over ``users`` (default: every user), optionally shuffled with ``generator``.

    Args:
        dataset: sequences.
        batch_size: sequences per batch (the last batch may be smaller).
        max_seq_len: truncation length.
        shuffle: random order (a permutation drawn from ``generator``).
        generator: RNG for the permutation (deterministic when seeded).
        users: ``[U']`` subset of rows to iterate (default all).

    Yields:
        :class:`SequenceBatch`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    rows = torch.arange(dataset.num_users) if users is None else users.to(torch.int64)
    if shuffle:
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
    for start in range(0, rows.numel(), batch_size):
        yield make_batch(dataset, rows[start : start + batch_size], max_seq_len)


def num_batches(num_rows: int, batch_size: int) -> int:
    """Number of batches :func:`iterate_batches` yields for ``num_rows`` rows."""
    return (num_rows + batch_size - 1) // batch_size
