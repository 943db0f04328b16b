"""Shared hypothesis strategies and builders for jagged batches."""

from dataclasses import dataclass
from typing import List, Optional

import torch
from hypothesis import strategies as st


@dataclass
class JaggedBatch:
    lengths: List[int]
    num_targets: Optional[List[int]]
    contextual_seq_len: int

    @property
    def seq_offsets(self) -> torch.Tensor:
        return torch.tensor([0] + list(torch.tensor(self.lengths).cumsum(0).tolist()), dtype=torch.int64) if self.lengths else torch.zeros(1, dtype=torch.int64)

    @property
    def total_len(self) -> int:
        return sum(self.lengths)

    @property
    def max_seq_len(self) -> int:
        return max([1] + self.lengths)

    def num_targets_tensor(self) -> Optional[torch.Tensor]:
        return None if self.num_targets is None else torch.tensor(self.num_targets, dtype=torch.int64)


@st.composite
def jagged_batches(
    draw,
    max_batch: int = 6,
    max_len: int = 24,
    with_targets: Optional[bool] = None,
    with_contextual: Optional[bool] = None,
    min_batch: int = 1,
) -> JaggedBatch:
    """Batches with empty and length-1 sequences among others.

    Lengths count the contextual prefix and targets: each sequence is
    ``[contextual c | history | targets]`` (an empty sequence has no prefix either only when
    ``c == 0``).
    """
    batch = draw(st.integers(min_batch, max_batch))
    use_ctx = draw(st.booleans()) if with_contextual is None else with_contextual
    c = draw(st.integers(1, 3)) if use_ctx else 0
    use_targets = draw(st.booleans()) if with_targets is None else with_targets
    lengths, targets = [], []
    for _ in range(batch):
        history = draw(st.sampled_from([0, 1, 2, draw(st.integers(0, max_len))]))
        t = draw(st.integers(0, 3)) if use_targets else 0
        n = c + history + t
        lengths.append(n)
        targets.append(t)
    return JaggedBatch(lengths=lengths, num_targets=targets if use_targets else None, contextual_seq_len=c)
