"""Relative attention bias for HSTU: the paper's relative position and time terms.

The HSTU of the paper (generative-recommenders' ``research/`` model, the one behind its
MovieLens and Amazon tables) adds a learned relative attention bias inside the pointwise
attention, ``silu(q k^T + rab) / N``: one weight per relative position ``i - j`` and one per
bucketed time difference. The library's :class:`~torchrec_hstu.modules.stu.STULayer` (GR's
production STU) has none; position and time enter only once, through the positional encoder.
:class:`RelativeBiasSTULayer` is an ``STULayer`` with that bias, for the retrieval models.

Differences from GR's research code, on purpose:

* The time term uses ``t_i - t_j`` (the query's own timestamp). GR's uses ``t_{i+1} - t_j``,
  the timestamp of the item being predicted, which at evaluation is the held-out item's; our
  evaluation does not read anything of the held-out item.
* The attention keeps the layer's ``alpha`` (``attn_alpha``, default ``1/sqrt(attention_dim)``)
  and its ``scaling_seqlen`` divisor; GR's research attention has no ``alpha``.

The attention runs densely in PyTorch on ``[B, H, S, S]`` (``S`` the batch's longest
sequence), whatever the layer's kernel: meant for CPU-sized models (MovieLens), not for the
fused kernels, and not exportable.

Symbols: ``B`` sequences, ``L`` tokens, ``S`` the longest sequence of the batch, ``H`` heads.
"""

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_hstu.modules.stu import STULayer
from torchrec_hstu.ops.hstu_compute import hstu_compute_uqvk
from torchrec_hstu.ops.jagged import jagged_token_positions

#: GR research's time bucketing: ``floor(ln(max(|dt|, 1)) / 0.301)`` (seconds).
TIME_BUCKET_DIVISOR = 0.301


def relative_time_buckets(dt: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """GR research's log buckets of a time difference, ``clamp(floor(ln(max(|dt|, 1)) / 0.301),
    0, num_buckets)``.

    Args:
        dt: any shape, seconds.
        num_buckets: largest bucket.

    Returns:
        int64, same shape.

    Example::

        >>> relative_time_buckets(torch.tensor([0, 1, 2, 60, 10**9]), 64).tolist()
        [0, 0, 2, 13, 64]
    """
    magnitude = dt.abs().to(torch.float64).clamp(min=1.0)
    return torch.clamp(torch.floor(torch.log(magnitude) / TIME_BUCKET_DIVISOR).to(torch.int64), 0, num_buckets)


class RelativeTimePositionBias(nn.Module):
    """``rab[b, i, j] = w_pos[i - j] + w_time[bucket(t_i - t_j)]`` for tokens ``i, j`` of
    sequence ``b`` (GR research's ``RelativeBucketedTimeAndPositionBasedBias`` with the query's
    own timestamp, see the module docstring).

    Args:
        max_seq_len: longest sequence (relative positions ``0 .. max_seq_len - 1``; farther
            pairs share the last weight).
        num_time_buckets: largest time bucket (``num_time_buckets + 1`` weights).
        init_std: std of the normal init of both tables (GR: 0.02).

    Example::

        >>> bias = RelativeTimePositionBias(max_seq_len=4, num_time_buckets=8)
        >>> bias(torch.tensor([0, 5, 9, 1, 2]), torch.tensor([0, 3, 5]), max_seq_len=3).shape
        torch.Size([2, 3, 3])
    """

    def __init__(self, max_seq_len: int, num_time_buckets: int = 128, init_std: float = 0.02) -> None:
        super().__init__()
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be > 0; got {max_seq_len}")
        if num_time_buckets <= 0:
            raise ValueError(f"num_time_buckets must be > 0; got {num_time_buckets}")
        self.max_seq_len = max_seq_len
        self.num_time_buckets = num_time_buckets
        # Index d = i - j + max_seq_len - 1 covers i - j in (-max_seq_len, max_seq_len) (GR's layout).
        self.position_weight = nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(0.0, init_std))
        self.time_weight = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(0.0, init_std))

    def forward(self, timestamps: torch.Tensor, offsets: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        """Bias of every (query, key) pair, padded.

        Args:
            timestamps: ``[L]`` seconds.
            offsets: ``[B + 1]``.
            max_seq_len: ``S`` (an int: no host read).

        Returns:
            ``[B, S, S]`` (entries of padding rows/columns are finite and meaningless).
        """
        padded_ts = padded_values(timestamps.to(torch.int64), offsets, max_seq_len)
        buckets = relative_time_buckets(padded_ts.unsqueeze(2) - padded_ts.unsqueeze(1), self.num_time_buckets)
        positions = torch.arange(max_seq_len, device=timestamps.device)
        rel = (positions.unsqueeze(1) - positions.unsqueeze(0)).clamp(-(self.max_seq_len - 1), self.max_seq_len - 1)
        position_bias = self.position_weight[rel + self.max_seq_len - 1]
        return position_bias.unsqueeze(0) + self.time_weight[buckets]


def padded_values(values: torch.Tensor, offsets: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """Jagged ``[L, ...]`` -> right-padded ``[B, S, ...]`` (zeros after each sequence)."""
    batch_ids, positions = jagged_token_positions(offsets.to(torch.int64), values.shape[0])
    out = values.new_zeros((offsets.numel() - 1, max(max_seq_len, 1)) + tuple(values.shape[1:]))
    return out.index_put((batch_ids, positions), values)


class RelativeBiasSTULayer(STULayer):
    """An :class:`~torchrec_hstu.modules.stu.STULayer` whose attention adds a
    :class:`RelativeTimePositionBias`: ``silu(alpha * q k^T + rab) / scaling_seqlen`` under the
    causal mask, then the layer's usual output (``x + dropout([u, a, u * Norm(a)]) W_out``).

    The layer needs each batch's timestamps, which the STU stack does not carry: the model sets
    them for the duration of its forward with :func:`relative_bias_timestamps`. Supports causal
    self-attention without targets, contextual prefix, window or FP8 (the retrieval setting).

    Args:
        embedding_dim, num_heads, hidden_dim, attention_dim: as :class:`STULayer`.
        max_seq_len: longest sequence (relative position weights).
        num_time_buckets: time buckets of the bias.
        **config: the other :class:`~torchrec_hstu.modules.stu.STULayerConfig` fields.

    Example::

        >>> layer = RelativeBiasSTULayer(16, 2, 8, 8, max_seq_len=4, scaling_seqlen=4)
        >>> with relative_bias_timestamps([layer], torch.tensor([0, 60, 0, 1, 2])):
        ...     layer(torch.randn(5, 16), torch.tensor([0, 2, 5]), max_seq_len=3).shape
        torch.Size([5, 16])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        hidden_dim: int,
        attention_dim: int,
        max_seq_len: int,
        num_time_buckets: int = 128,
        **config: Any,
    ) -> None:
        super().__init__(embedding_dim, num_heads, hidden_dim, attention_dim, **config)
        cfg = self.config
        unsupported = {
            "causal=False": not cfg.causal,
            "max_attn_len": bool(cfg.max_attn_len),
            "contextual_seq_len": cfg.contextual_seq_len > 0,
            "sla_k1/sla_k2": bool(cfg.sla_k1 or cfg.sla_k2),
            "fp8_quant_mode": cfg.fp8_quant_mode >= 0,
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"RelativeBiasSTULayer supports plain causal attention only; unset {bad}")
        self.relative_bias = RelativeTimePositionBias(max_seq_len, num_time_buckets)
        self.batch_timestamps: Optional[torch.Tensor] = None

    def _attend(
        self,
        x: torch.Tensor,
        x_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: Optional[torch.Tensor],
        attention_cache: Optional[Dict[str, Any]],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(u, attn, k, v)`` as :meth:`STULayer._attend`, with the relative bias."""
        if self.batch_timestamps is None or self.batch_timestamps.shape[0] != x.shape[0]:
            raise ValueError(
                "RelativeBiasSTULayer needs the batch's [L] timestamps: run it inside "
                "relative_bias_timestamps(layers, timestamps) with one timestamp per token of x"
            )
        if num_targets is not None:
            raise ValueError("RelativeBiasSTULayer does not support num_targets; pass None")
        cfg = self.config
        u, q, k, v = hstu_compute_uqvk(x, *self._projection(), uvqk_activation=cfg.uvqk_activation)
        s = max(max_seq_len, 1)
        pq, pk, pv = (padded_values(t, x_offsets, s).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        bias = self.relative_bias(self.batch_timestamps.to(x.device), x_offsets, s)
        scores = cfg.alpha * pq @ pk.transpose(-1, -2) + bias.unsqueeze(1).to(q.dtype)
        scaling = cfg.scaling_seqlen if cfg.scaling_seqlen > 0 else s
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        weights = F.silu(scores) * causal.to(q.dtype) / scaling
        out = (weights @ pv).transpose(1, 2)  # [B, S, H, Dv]
        batch_ids, positions = jagged_token_positions(x_offsets.to(torch.int64), x.shape[0])
        attn = out[batch_ids, positions].reshape(x.shape[0], cfg.num_heads * cfg.hidden_dim)
        return u, attn, k, v

    def prefill(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("RelativeBiasSTULayer has no KV-cached inference")

    def cached_forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("RelativeBiasSTULayer has no KV-cached inference")


@contextlib.contextmanager
def relative_bias_timestamps(layers: List[RelativeBiasSTULayer], timestamps: torch.Tensor) -> Iterator[None]:
    """Give ``layers`` the ``[L]`` timestamps of the batch they are about to run on, and take
    them back afterwards (also on error)."""
    for layer in layers:
        layer.batch_timestamps = timestamps
    try:
        yield
    finally:
        for layer in layers:
            layer.batch_timestamps = None

