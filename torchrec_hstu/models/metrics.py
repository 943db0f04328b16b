"""Retrieval metrics against the full catalogue: HR@K, NDCG@K and MRR.

For each query ``b`` with scores ``[N]`` over the catalogue and held-out item ``y_b``, the
rank is the number of items scored strictly higher than ``y_b`` (0 = top). Ties therefore
count in the target's favour; baselines with many tied scores are favoured by it, never HSTU.

* ``HR@K = mean(rank < K)``
* ``NDCG@K = mean(1 / log2(rank + 2) if rank < K else 0)`` (one relevant item, ideal DCG 1)
* ``MRR = mean(1 / (rank + 1))`` (over the full ranking, no cut-off)
"""

from typing import Dict, List, Sequence

import torch

DEFAULT_KS = (10, 50)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items.

    Args:
        scores: ``[B, N]`` float scores.
        targets: ``[B]`` int64 item ids in ``[0, N)``.

    Returns:
        ``[B]`` int64 ranks (number of items scored strictly higher).
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(
            f"scores must be [B, N] and targets [B]; got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    target_scores = scores.gather(1, targets.to(torch.int64).unsqueeze(1))
    return (scores > target_scores).sum(dim=1)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """HR@K, NDCG@K for each ``K`` in ``ks`` and MRR from ``[B]`` 0-based ranks."""
    if ranks.numel() == 0:
        raise ValueError("ranks must not be empty")
    ranks = ranks.to(torch.float64)
    out: Dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks)).mean().item()
    out["MRR"] = (1.0 / (ranks + 1.0)).mean().item()
    return out


class RankAccumulator:
    """Collect target ranks over evaluation batches, then compute the metrics.

    Example::

        >>> acc = RankAccumulator()
        >>> acc.update(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([2]))
        >>> acc.compute()["HR@10"]
        1.0
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS) -> None:
        self.ks = tuple(ks)
        self._ranks: List[torch.Tensor] = []

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        self._ranks.append(target_ranks(scores, targets).cpu())

    def ranks(self) -> torch.Tensor:
        return torch.cat(self._ranks) if self._ranks else torch.zeros(0, dtype=torch.int64)

    def compute(self) -> Dict[str, float]:
        return metrics_from_ranks(self.ranks(), self.ks)
