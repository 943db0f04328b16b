"""Non-neural retrieval baselines scored on the same split as HSTU.

* :class:`MostPopular`: every user gets the catalogue ranked by training interaction count.
* :class:`FirstOrderMarkov`: the next item is ranked by how often it followed the user's last
  item in training (item-to-item transition counts), ties broken by popularity.
"""

import torch

from torchrec_hstu.data.sequences import SequenceBatch, SequenceDataset
from torchrec_hstu.ops.jagged import lengths_to_offsets


class MostPopular:
    """Rank items by training popularity.

    Args:
        train: training sequences.

    Example::

        >>> ds = SequenceDataset(torch.tensor([1, 1, 0]), torch.zeros(3, dtype=torch.int64),
        ...                      torch.tensor([0, 3]), num_items=2)
        >>> MostPopular(ds).counts.tolist()
        [1, 2]
    """

    name = "most-popular"

    def __init__(self, train: SequenceDataset) -> None:
        self.num_items = train.num_items
        self.counts = train.item_counts()

    def scores(self, batch: SequenceBatch) -> torch.Tensor:
        """``[B, N]`` float scores (the same row for every user)."""
        return self.counts.to(torch.float32).unsqueeze(0).expand(batch.batch_size, -1)


class FirstOrderMarkov:
    """Item-to-item transition counts ``C[i, j]`` = times ``j`` directly followed ``i``.

    ``score(j | last = i) = C[i, j] + p(j)`` with ``p(j) in [0, 1)`` the item's training count
    divided by (max count + 1): popularity only breaks ties between equal transition counts,
    including for a last item never seen with a successor. Stored sparsely (CSR rows).

    Args:
        train: training sequences.
    """

    name = "markov-1st-order"

    def __init__(self, train: SequenceDataset) -> None:
        n = train.num_items
        self.num_items = n
        counts = train.item_counts().to(torch.float64)
        self.tie_break = (counts / (counts.max() + 1.0)).to(torch.float32)
        # Consecutive pairs inside each user's sequence.
        src_index = torch.arange(train.num_interactions - 1) if train.num_interactions > 0 else torch.zeros(0, dtype=torch.int64)
        same_user = torch.ones_like(src_index, dtype=torch.bool)
        ends = train.offsets[1:] - 1  # last token of each user: no successor in its own sequence
        same_user[ends[(ends >= 0) & (ends < src_index.numel())]] = False
        src = train.item_ids[src_index[same_user]]
        dst = train.item_ids[src_index[same_user] + 1]
        keys, pair_counts = torch.unique(src * n + dst, return_counts=True)  # sorted by src, dst
        self.dst = keys % n
        self.values = pair_counts.to(torch.float32)
        self.row_offsets = lengths_to_offsets(torch.bincount(keys // n, minlength=n))

    def transition_counts(self, item: int) -> torch.Tensor:
        """``[N]`` dense row ``C[item, :]``."""
        row = torch.zeros(self.num_items)
        start, end = int(self.row_offsets[item]), int(self.row_offsets[item + 1])
        row[self.dst[start:end]] = self.values[start:end]
        return row

    def scores(self, batch: SequenceBatch) -> torch.Tensor:
        """``[B, N]`` scores from each sequence's last item (every sequence must be non-empty)."""
        if bool((batch.lengths <= 0).any()):
            raise ValueError("FirstOrderMarkov needs a non-empty history for every sequence")
        last = batch.item_ids[lengths_to_offsets(batch.lengths)[1:] - 1]
        starts, ends = self.row_offsets[last], self.row_offsets[last + 1]
        sizes = ends - starts
        rows = torch.repeat_interleave(torch.arange(last.numel()), sizes)
        entries = torch.arange(int(sizes.sum())) + torch.repeat_interleave(starts - lengths_to_offsets(sizes)[:-1], sizes)
        out = self.tie_break.unsqueeze(0).repeat(last.numel(), 1)
        out[rows, self.dst[entries]] += self.values[entries]
        return out
