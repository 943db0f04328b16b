"""HSTU positional encoder: reversed positions plus time-gap buckets."""

import math
from typing import Optional

import torch
from torch import nn

from torchrec_hstu.ops.jagged import jagged_token_positions

_TIME_BUCKET_FNS = ("sqrt", "log")


class HSTUPositionalEncoder(nn.Module):
    """``out = sqrt(d) * x + P[position index] + T[time bucket]``.

    Position index (counted back from the end of the history): with ``n`` the length, ``T`` the
    targets and ``c`` the contextual prefix, ``high = n - T``; a token at ``i >= c`` gets
    ``min(high - min(i, high) + c, num_position_buckets - 1)`` (every target gets ``c``, the
    latest history token ``c + 1``), a contextual token gets ``min(i, num_position_buckets - 1)``.

    Time bucket: ``dt = max(t_last - t_i, 1e-6) / time_bucket_increments`` with ``t_last`` the
    sequence's last timestamp, bucket ``= clamp(trunc(sqrt(dt) or log(dt)), 0, num_time_buckets)``.

    Args:
        num_position_buckets: rows of the position table.
        num_time_buckets: largest time bucket (table has ``num_time_buckets + 1`` rows).
        embedding_dim: ``d``.
        contextual_seq_len: contextual prefix length ``c``.
        use_time_encoding: add the time-bucket embedding.
        time_bucket_fn: ``"sqrt"`` or ``"log"``.
        time_bucket_increments: units of one time step (60: seconds -> minutes).

    Example::

        >>> enc = HSTUPositionalEncoder(16, 8, embedding_dim=4)
        >>> enc(torch.randn(3, 4), torch.tensor([0, 3]), torch.tensor([0, 60, 120])).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        num_position_buckets: int,
        num_time_buckets: int,
        embedding_dim: int,
        contextual_seq_len: int = 0,
        use_time_encoding: bool = True,
        time_bucket_fn: str = "sqrt",
        time_bucket_increments: float = 60.0,
    ) -> None:
        super().__init__()
        if num_position_buckets <= 0:
            raise ValueError(f"num_position_buckets must be > 0; got {num_position_buckets}")
        if use_time_encoding and num_time_buckets <= 0:
            raise ValueError(
                f"num_time_buckets must be > 0 when use_time_encoding is on; got {num_time_buckets}"
            )
        if time_bucket_fn not in _TIME_BUCKET_FNS:
            raise ValueError(f"time_bucket_fn must be one of {_TIME_BUCKET_FNS}; got {time_bucket_fn!r}")
        if time_bucket_increments <= 0:
            raise ValueError(f"time_bucket_increments must be > 0; got {time_bucket_increments}")
        self.num_position_buckets = num_position_buckets
        self.num_time_buckets = num_time_buckets
        self.embedding_dim = embedding_dim
        self.contextual_seq_len = contextual_seq_len
        self.use_time_encoding = use_time_encoding
        self.time_bucket_fn = time_bucket_fn
        self.time_bucket_increments = time_bucket_increments
        self.position_embeddings = nn.Parameter(torch.empty(num_position_buckets, embedding_dim))
        self.timestamp_embeddings = nn.Parameter(
            torch.empty(max(num_time_buckets, 0) + 1, embedding_dim)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = math.sqrt(1.0 / self.num_position_buckets)
        nn.init.uniform_(self.position_embeddings, -bound, bound)
        bound = math.sqrt(1.0 / max(self.num_time_buckets, 1))
        nn.init.uniform_(self.timestamp_embeddings, -bound, bound)

    def position_index(
        self, seq_offsets: torch.Tensor, total_len: int, num_targets: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``[L]`` int64 position-table rows."""
        batch_ids, positions = jagged_token_positions(seq_offsets.to(torch.int64), total_len)
        lengths = (seq_offsets[1:] - seq_offsets[:-1]).to(torch.int64)
        high = lengths if num_targets is None else lengths - num_targets.to(torch.int64)
        high = high[batch_ids]
        c = self.contextual_seq_len
        reversed_index = high - torch.minimum(positions, high) + c
        index = torch.where(positions < c, positions, reversed_index)
        return torch.clamp(index, max=self.num_position_buckets - 1)

    def time_bucket(self, seq_offsets: torch.Tensor, seq_timestamps: torch.Tensor) -> torch.Tensor:
        """``[L]`` int64 time-table rows."""
        total_len = seq_timestamps.shape[0]
        batch_ids, _ = jagged_token_positions(seq_offsets.to(torch.int64), total_len)
        last_token = seq_offsets.to(torch.int64)[1:][batch_ids] - 1
        query_time = seq_timestamps[last_token]
        dt = torch.clamp((query_time - seq_timestamps).to(torch.float64), min=1e-6)
        dt = dt / self.time_bucket_increments
        scaled = torch.sqrt(dt) if self.time_bucket_fn == "sqrt" else torch.log(dt)
        return torch.clamp(scaled.to(torch.int64), min=0, max=self.num_time_buckets)

    def forward(
        self,
        seq_embeddings: torch.Tensor,
        seq_offsets: torch.Tensor,
        seq_timestamps: Optional[torch.Tensor] = None,
        num_targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            seq_embeddings: ``[L, d]``.
            seq_offsets: ``[B + 1]``.
            seq_timestamps: ``[L]`` (seconds); required with ``use_time_encoding``.
            num_targets: optional ``[B]``.

        Returns:
            ``[L, d]``.
        """
        if seq_embeddings.dim() != 2 or seq_embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"seq_embeddings must be [L, {self.embedding_dim}]; got {tuple(seq_embeddings.shape)}"
            )
        total_len = seq_embeddings.shape[0]
        table_sum = self.position_embeddings[self.position_index(seq_offsets, total_len, num_targets)]
        if self.use_time_encoding:
            if seq_timestamps is None or seq_timestamps.shape != (total_len,):
                raise ValueError(
                    f"seq_timestamps must be [L]=[{total_len}] when use_time_encoding is on; got "
                    f"{None if seq_timestamps is None else tuple(seq_timestamps.shape)}"
                )
            table_sum = table_sum + self.timestamp_embeddings[self.time_bucket(seq_offsets, seq_timestamps)]
        scale = math.sqrt(self.embedding_dim)
        return seq_embeddings * scale + table_sum.to(seq_embeddings.dtype)
