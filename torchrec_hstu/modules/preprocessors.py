"""Input preprocessors: turn item embeddings into the token sequence the STU stack sees.

Layout after preprocessing: ``[contextual C | history | targets]`` per sequence.
"""

import dataclasses
import math
from typing import List, Optional

import torch
from torch import nn

from torchrec_hstu.ops.jagged import concat_2D_jagged, jagged_token_positions, lengths_to_offsets


class SwishLayerNorm(nn.Module):
    """``x * sigmoid(LayerNorm(x))``, in the norm's dtype (float32 for half-precision inputs)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(self.norm.weight.dtype)
        return (wide * torch.sigmoid(self.norm(wide))).to(x.dtype)


def contextualized_mlp(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    """``Linear -> SwishLayerNorm -> Linear -> LayerNorm`` (xavier weights, zero biases)."""
    mlp = nn.Sequential(
        nn.Linear(input_dim, hidden_dim),
        SwishLayerNorm(hidden_dim),
        nn.Linear(hidden_dim, output_dim),
        nn.LayerNorm(output_dim),
    )
    for module in mlp:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return mlp


class ActionEncoder(nn.Module):
    """Encode per-token action bitmasks (click, like, ...) as embeddings.

    A history token with action bits ``a`` gets ``[E_k if a & w_k else 0 for each k]``
    concatenated (``w_k`` = ``action_weights[k]``); a target token gets one learned
    "target" embedding of the same width, so labels never leak into candidates.

    Args:
        action_embedding_dim: width per action type.
        action_weights: bit of each action type.
        embedding_init_std: init std of the tables.
    """

    action_weights: torch.Tensor  # buffer registered in __init__

    def __init__(
        self, action_embedding_dim: int, action_weights: List[int], embedding_init_std: float = 0.1
    ) -> None:
        super().__init__()
        if action_embedding_dim <= 0 or len(action_weights) == 0:
            raise ValueError(
                f"action_embedding_dim must be > 0 and action_weights non-empty; got "
                f"{action_embedding_dim}, {action_weights}"
            )
        self.register_buffer("action_weights", torch.tensor(action_weights, dtype=torch.int64), persistent=False)
        self.action_embeddings = nn.Parameter(
            torch.randn(len(action_weights), action_embedding_dim) * embedding_init_std
        )
        self.target_embedding = nn.Parameter(
            torch.randn(len(action_weights) * action_embedding_dim) * embedding_init_std
        )

    @property
    def output_dim(self) -> int:
        return self.action_embeddings.numel()

    def forward(self, seq_actions: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
        """``seq_actions: [L]`` int bitmasks, ``is_target: [L]`` bool -> ``[L, output_dim]``."""
        bits = (seq_actions.to(torch.int64).unsqueeze(-1) & self.action_weights) > 0
        history = (bits.unsqueeze(-1).to(self.action_embeddings.dtype) * self.action_embeddings).flatten(1)
        return torch.where(is_target.unsqueeze(-1), self.target_embedding.expand_as(history), history)


@dataclasses.dataclass
class PreprocessorOutput:
    """The token sequence for the STU stack.

    Attributes:
        seq_embeddings: ``[L', d]`` (``L' = L + B * C``).
        seq_offsets: ``[B + 1]``.
        seq_timestamps: ``[L']`` or None (contextual tokens get 0).
        num_targets: ``[B]`` or None (unchanged: targets stay at the end).
        max_seq_len: ``max_seq_len + C``.
    """

    seq_embeddings: torch.Tensor
    seq_offsets: torch.Tensor
    seq_timestamps: Optional[torch.Tensor]
    num_targets: Optional[torch.Tensor]
    max_seq_len: int


class ContextualPreprocessor(nn.Module):
    """Content MLP, optional action encoder, optional contextual tokens prepended.

    Args:
        input_embedding_dim: width of the incoming item embeddings.
        output_embedding_dim: ``d`` of the STU stack.
        hidden_dim: hidden width of the content (and action) MLP.
        contextual_feature_dim: width of each contextual feature (0: no contextual tokens).
        max_contextual_seq_len: number of contextual tokens ``C`` prepended per sequence.
        action_embedding_dim: width per action type (0: no action encoder).
        action_weights: bit of each action type.
        action_hidden_dim: hidden width of the action MLP (default ``hidden_dim``).

    Example::

        >>> pre = ContextualPreprocessor(8, 16, 32)
        >>> out = pre(torch.randn(5, 8), torch.tensor([0, 2, 5]), max_seq_len=3)
        >>> out.seq_embeddings.shape
        torch.Size([5, 16])
    """

    def __init__(
        self,
        input_embedding_dim: int,
        output_embedding_dim: int,
        hidden_dim: int,
        contextual_feature_dim: int = 0,
        max_contextual_seq_len: int = 0,
        action_embedding_dim: int = 0,
        action_weights: Optional[List[int]] = None,
        action_hidden_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if max_contextual_seq_len < 0 or (max_contextual_seq_len > 0 and contextual_feature_dim <= 0):
            raise ValueError(
                "max_contextual_seq_len must be >= 0, and contextual_feature_dim > 0 when it is set; got "
                f"max_contextual_seq_len={max_contextual_seq_len}, contextual_feature_dim={contextual_feature_dim}"
            )
        self.input_embedding_dim = input_embedding_dim
        self.output_embedding_dim = output_embedding_dim
        self.contextual_feature_dim = contextual_feature_dim
        self.max_contextual_seq_len = max_contextual_seq_len
        self.content_mlp = contextualized_mlp(input_embedding_dim, hidden_dim, output_embedding_dim)
        self.action_encoder: Optional[ActionEncoder] = None
        self.action_mlp: Optional[nn.Module] = None
        if action_weights:
            self.action_encoder = ActionEncoder(action_embedding_dim, list(action_weights))
            self.action_mlp = contextualized_mlp(
                self.action_encoder.output_dim, action_hidden_dim or hidden_dim, output_embedding_dim
            )
        if max_contextual_seq_len > 0:
            std = math.sqrt(2.0 / (contextual_feature_dim + output_embedding_dim))
            self.contextual_weight = nn.Parameter(
                torch.randn(max_contextual_seq_len, contextual_feature_dim, output_embedding_dim) * std
            )
            self.contextual_bias = nn.Parameter(torch.zeros(max_contextual_seq_len, output_embedding_dim))

    def contextual_seq_len(self) -> int:
        return self.max_contextual_seq_len

    def forward(
        self,
        seq_embeddings: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        seq_timestamps: Optional[torch.Tensor] = None,
        num_targets: Optional[torch.Tensor] = None,
        contextual_embeddings: Optional[torch.Tensor] = None,
        seq_actions: Optional[torch.Tensor] = None,
    ) -> PreprocessorOutput:
        """
        Args:
            seq_embeddings: ``[L, input_embedding_dim]`` item embeddings (history then targets).
            seq_offsets: ``[B + 1]``.
            max_seq_len: batch maximum length.
            seq_timestamps: optional ``[L]``.
            num_targets: optional ``[B]``.
            contextual_embeddings: ``[B, C, contextual_feature_dim]`` when ``C > 0``.
            seq_actions: ``[L]`` int action bitmasks when the action encoder is on.

        Returns:
            :class:`PreprocessorOutput`.
        """
        if seq_embeddings.dim() != 2 or seq_embeddings.shape[1] != self.input_embedding_dim:
            raise ValueError(
                f"seq_embeddings must be [L, {self.input_embedding_dim}]; got {tuple(seq_embeddings.shape)}"
            )
        total_len = seq_embeddings.shape[0]
        batch_size = seq_offsets.numel() - 1
        embeddings = self.content_mlp(seq_embeddings)
        if self.action_encoder is not None:
            if seq_actions is None or seq_actions.shape != (total_len,):
                raise ValueError(f"seq_actions must be [L]=[{total_len}] int bitmasks with action_weights set")
            batch_ids, positions = jagged_token_positions(seq_offsets.to(torch.int64), total_len)
            lengths = (seq_offsets[1:] - seq_offsets[:-1]).to(torch.int64)
            targets = torch.zeros_like(lengths) if num_targets is None else num_targets.to(torch.int64)
            is_target = positions >= (lengths - targets)[batch_ids]
            actions = self.action_encoder(seq_actions, is_target).to(embeddings.dtype)
            assert self.action_mlp is not None  # built together with action_encoder
            embeddings = embeddings + self.action_mlp(actions)
        c = self.max_contextual_seq_len
        if c == 0:
            return PreprocessorOutput(embeddings, seq_offsets, seq_timestamps, num_targets, max_seq_len)
        expected = (batch_size, c, self.contextual_feature_dim)
        if contextual_embeddings is None or tuple(contextual_embeddings.shape) != expected:
            raise ValueError(
                f"contextual_embeddings must be [B, C, contextual_feature_dim]={list(expected)}; got "
                f"{None if contextual_embeddings is None else tuple(contextual_embeddings.shape)}"
            )
        # One linear map per contextual slot: [C, B, F] @ [C, F, d] -> [C, B, d].
        contextual = torch.baddbmm(
            self.contextual_bias.unsqueeze(1).to(embeddings.dtype),
            contextual_embeddings.transpose(0, 1).to(embeddings.dtype),
            self.contextual_weight.to(embeddings.dtype),
        ).transpose(0, 1).reshape(batch_size * c, -1)
        prefix_offsets = lengths_to_offsets(torch.full((batch_size,), c, device=seq_offsets.device))
        seq_offsets = seq_offsets.to(torch.int64)
        embeddings = concat_2D_jagged(contextual, embeddings, prefix_offsets, seq_offsets)
        if seq_timestamps is not None:
            seq_timestamps = concat_2D_jagged(
                seq_timestamps.new_zeros(batch_size * c), seq_timestamps, prefix_offsets, seq_offsets
            )
        return PreprocessorOutput(
            embeddings, prefix_offsets + seq_offsets, seq_timestamps, num_targets, max_seq_len + c
        )
