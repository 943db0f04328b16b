"""Output postprocessors applied to the transducer's output embeddings."""

from typing import List, Optional

import torch
from torch import nn


class OutputPostprocessor(nn.Module):
    """Base: ``forward(seq_embeddings [L, d], seq_timestamps [L] or None) -> [L, d]``."""

    def forward(
        self, seq_embeddings: torch.Tensor, seq_timestamps: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        raise NotImplementedError


class L2NormPostprocessor(OutputPostprocessor):
    """``e / max(||e||_2, eps)`` over the last dim (the generative-recommenders default)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(
        self, seq_embeddings: torch.Tensor, seq_timestamps: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return seq_embeddings / torch.clamp(seq_embeddings.norm(dim=-1, keepdim=True), min=self.eps)


class LayerNormPostprocessor(OutputPostprocessor):
    """LayerNorm over the embedding dim (in the norm's dtype, returned in the input's)."""

    def __init__(self, embedding_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embedding_dim, eps=eps)

    def forward(
        self, seq_embeddings: torch.Tensor, seq_timestamps: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.norm(seq_embeddings.to(self.norm.weight.dtype)).to(seq_embeddings.dtype)


class TimestampLayerNormPostprocessor(OutputPostprocessor):
    """Concatenate periodic time features, project back to ``d`` and LayerNorm.

    For each ``(period_unit, units_per_period)`` pair (e.g. ``(3600, 24)`` hour of day,
    ``(86400, 7)`` day of week): ``phase = (floor(t / period_unit) mod units_per_period) /
    units_per_period * 2 * 3.14`` and the features ``cos(phase), sin(phase)``; then
    ``LayerNorm(Linear([e, features]))``. (3.14, not pi, as the anchors.)

    Args:
        embedding_dim: ``d``.
        time_duration_period_units: period units in seconds.
        time_duration_units_per_period: units in one period, same length.
        eps: LayerNorm epsilon.
    """

    period_units: torch.Tensor  # buffers registered in __init__
    units_per_period: torch.Tensor

    def __init__(
        self,
        embedding_dim: int,
        time_duration_period_units: List[int],
        time_duration_units_per_period: List[int],
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if len(time_duration_period_units) != len(time_duration_units_per_period):
            raise ValueError(
                "time_duration_period_units and time_duration_units_per_period must have the same "
                f"length; got {len(time_duration_period_units)} and {len(time_duration_units_per_period)}"
            )
        if len(time_duration_period_units) == 0:
            raise ValueError("time_duration_period_units must not be empty")
        self.register_buffer(
            "period_units", torch.tensor(time_duration_period_units, dtype=torch.float64), persistent=False
        )
        self.register_buffer(
            "units_per_period",
            torch.tensor(time_duration_units_per_period, dtype=torch.float64),
            persistent=False,
        )
        num_features = 2 * len(time_duration_period_units)
        self.linear = nn.Linear(embedding_dim + num_features, embedding_dim)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(embedding_dim, eps=eps)

    def forward(
        self, seq_embeddings: torch.Tensor, seq_timestamps: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if seq_timestamps is None or seq_timestamps.shape != seq_embeddings.shape[:1]:
            raise ValueError(
                f"TimestampLayerNormPostprocessor needs seq_timestamps of shape [L]={tuple(seq_embeddings.shape[:1])}"
            )
        t = seq_timestamps.to(torch.float64).unsqueeze(-1)
        units = torch.floor(t / self.period_units)
        phase = torch.remainder(units, self.units_per_period) / self.units_per_period * 2 * 3.14
        features = torch.stack([torch.cos(phase), torch.sin(phase)], dim=-1).flatten(1).float()
        combined = torch.cat([seq_embeddings.float(), features], dim=-1)
        return self.norm(self.linear(combined)).to(seq_embeddings.dtype)
