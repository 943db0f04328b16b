"""Splitting the data across ranks: global batches, each rank's share, padded evaluation.

Symbols: ``U`` rows (users) of a dataset, ``G`` global batch size, ``W`` ranks.

Training draws one permutation of the rows per epoch from a generator that depends only on
``(seed, epoch)``, cuts it into global batches of ``G`` rows and gives rank ``r`` the
``r``-th contiguous slice of each (sizes differ by at most one). A run with ``W`` ranks
therefore sees exactly the global batches of a one-process run, whatever ``W``, and a
resumed run continues with the batches an uninterrupted run would have seen. Each rank
materializes (gathers, truncates, moves) only its own slice.

Evaluation splits the rows into ``W`` contiguous shares; every rank must run the same
number of forward calls (the sharded lookups are collective), so a rank whose share is
exhausted runs padding batches whose results are discarded.
"""

from typing import Iterator, Tuple

import torch

_SEED_STRIDE = 1_000_003


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """``[U]`` the row order of ``epoch``: a function of ``(seed, epoch)`` only."""
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0; got {num_rows}")
    generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch)
    return torch.randperm(num_rows, generator=generator)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """RNG of one training step (e.g. sampled negatives), identical on every rank and
    a function of ``(seed, epoch, step)`` only, so resuming mid-epoch draws the same."""
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + epoch) * _SEED_STRIDE + step)


def num_global_batches(num_rows: int, global_batch_size: int, drop_last: bool = True) -> int:
    """Global batches per epoch (a last partial batch counts only without ``drop_last``)."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be > 0; got {global_batch_size}")
    return num_rows // global_batch_size if drop_last else -(-num_rows // global_batch_size)


def rank_slice(rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous part of ``rows`` (``[n] -> [n // W or n // W + 1]``).

    The first ``n % W`` ranks get one row more; concatenating the slices in rank order
    gives ``rows`` back.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    n = rows.numel()
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return rows[start : start + base + (1 if rank < extra else 0)]


def train_shards(
    num_rows: int,
    global_batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    start_step: int = 0,
    drop_last: bool = True,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(step, rows of this rank)`` for the global batches of ``epoch`` from ``start_step``.

    Args:
        num_rows: ``U``.
        global_batch_size: ``G`` (must be >= ``world_size`` so no rank gets an empty share).
        seed: data-order seed.
        epoch: epoch index.
        rank: this rank.
        world_size: ``W``.
        start_step: first global batch (resume).
        drop_last: skip a last partial global batch.

    Yields:
        ``(step, rows [G // W or G // W + 1])``.
    """
    if global_batch_size < world_size:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be >= world_size={world_size} "
            "(every rank needs at least one sequence per step)"
        )
    order = epoch_permutation(num_rows, seed, epoch)
    total = num_global_batches(num_rows, global_batch_size, drop_last)
    for step in range(start_step, total):
        rows = order[step * global_batch_size : (step + 1) * global_batch_size]
        if rows.numel() < world_size:
            return
        yield step, rank_slice(rows, rank, world_size)


def eval_shards(
    num_rows: int, batch_size: int, rank: int, world_size: int
) -> Iterator[Tuple[torch.Tensor, bool]]:
    """This rank's evaluation batches, padded to the same count on every rank.

    Args:
        num_rows: ``U`` rows to evaluate (each exactly once over all ranks).
        batch_size: rows per batch and rank.
        rank: this rank.
        world_size: ``W``.

    Yields:
        ``(rows, valid)``: when ``valid`` is False the batch is padding (row 0) and its
        results must be dropped.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    share = rank_slice(torch.arange(num_rows), rank, world_size)
    longest = -(-num_rows // world_size)
    count = -(-longest // batch_size)
    for i in range(count):
        rows = share[i * batch_size : (i + 1) * batch_size]
        if rows.numel() == 0:
            yield torch.zeros(1, dtype=torch.int64), False
        else:
            yield rows, True

