"""Shared hypothesis strategies, builders and independent oracles for jagged batches.

The mask rules here are written from the notes in plain Python (one (query, key) pair at a
time) and share no code with ``torchrec_hstu``, so tests built on them can fail.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from hypothesis import strategies as st


@dataclass
class JaggedBatch:
    """Lengths (contextual prefix and targets included), targets per sequence, prefix ``c``."""

    lengths: List[int]
    num_targets: Optional[List[int]]
    contextual_seq_len: int

    @property
    def seq_offsets(self) -> torch.Tensor:
        offsets = [0]
        for n in self.lengths:
            offsets.append(offsets[-1] + n)
        return torch.tensor(offsets, dtype=torch.int64)

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


# ------------------------------------------------------------------ mask oracles
def gr_mask_rule(
    n: int,
    targets: Optional[int],
    c: int,
    window: int,
    min_full: int,
    causal: bool,
) -> List[List[bool]]:
    """The generative-recommenders rule, written out per (query i, key j)."""
    if c > 0:
        ids = [max(i - c + 1, 0) for i in range(n)]
        max_id = n - c + 1
    else:
        ids = list(range(n))
        max_id = n
    if targets is not None:
        max_id -= targets
        ids = [min(x, max_id) for x in ids]
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            dist = ids[i] - ids[j]
            if not causal:
                dist = abs(dist)
            ok = i == j or dist > 0
            if window > 0:
                ok = ok and (dist <= window or (min_full > 0 and ids[i] >= max_id - min_full))
            if c > 0 and ids[i] == 0 and ids[j] < max_id:
                ok = True
            row.append(ok)
        rows.append(row)
    return rows


def sla_mask_rule(n: int, targets: Optional[int], c: int, k1: int, k2: int) -> List[List[bool]]:
    """tzrec's SLA intervals: history p sees [0, min(p+1, K2)) U [max(p-K1+1, K2), p+1);
    a target sees exactly the history [0, H)."""
    k2_eff = max(k2, c)
    history_end = max(n - (targets or 0), 0)
    rows = []
    for p in range(n):
        if p >= history_end:
            rows.append([j < history_end for j in range(n)])
            continue
        lo0, hi0 = 0, min(p + 1, k2_eff)
        lo1, hi1 = max(p - k1 + 1, k2_eff), p + 1
        rows.append([(lo0 <= j < hi0) or (lo1 <= j < hi1) for j in range(n)])
    return rows


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: List[int],
    alpha: float,
    divisor: float,
    mask_fn: Callable[[int, int], List[List[bool]]],
) -> torch.Tensor:
    """Per sequence, dense, float64: ``(silu(alpha q k^T) / divisor * mask) @ v``.

    ``q, k: [L, H, Dqk]``, ``v: [L, H, Dv]``; ``mask_fn(b, n)`` gives sequence ``b``'s mask.
    Differentiable (autograd through plain ops) -> ``[L, H, Dv]`` float64.
    """
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    start = 0
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        qs, ks, vs = (x[start : start + n].double() for x in (q, k, v))
        mask = torch.tensor(mask_fn(b, n), dtype=torch.float64)  # [n, n]
        scores = alpha * torch.einsum("ihd,jhd->hij", qs, ks)
        weights = F.silu(scores) / divisor * mask
        out[start : start + n] = torch.einsum("hij,jhd->ihd", weights, vs)
        start += n
    return out
