"""Reducing values and metrics across ranks (every function is collective under a process
group, and a no-op reduction without one).

Retrieval metrics (HR/NDCG/MRR) are means over users of a function of each user's rank,
AUC is not a mean at all; both are therefore computed from the gathered per-example values
(:func:`all_gather_1d`), which gives exactly the single-process number.
"""

from typing import List

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (returns a new tensor; the input is unchanged)."""
    out = values.detach().clone()
    if _initialized():
        dist.all_reduce(out)
    return out


def all_gather_1d(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank, in rank order.

    Args:
        values: ``[n_r]`` (``n_r`` may differ per rank; same dtype everywhere).

    Returns:
        ``[sum_r n_r]`` on ``values.device``.
    """
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D; got shape {tuple(values.shape)}")
    if not _initialized() or dist.get_world_size() == 1:
        return values
    world = dist.get_world_size()
    size = torch.tensor([values.numel()], dtype=torch.int64, device=values.device)
    sizes: List[torch.Tensor] = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])
