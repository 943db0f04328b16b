"""STU layers: the Sequential Transduction Unit of HSTU and a stack of them.

One layer, on jagged token embeddings ``x: [L, d]``::

    u, v, q, k = split(LayerNorm(x) @ W_uvqk + b);  u = silu(u)
    a = hstu_attention(q, k, v)                      # silu(alpha q k^T) / N * mask, then @ v
    out = x + dropout([u, a, u * Norm(a)]) @ W_out
"""

import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel, to_kernel
from torchrec_hstu.ops.hstu_compute import hstu_compute_output, hstu_preprocess_and_attention
from torchrec_hstu.ops.truncation import TruncationPlan, compute_truncation_plan

logger = logging.getLogger(__name__)

#: LayerNorm epsilon of the STU input and output norms (generative-recommenders value).
STU_NORM_EPS = 1e-6


@dataclasses.dataclass
class STULayerConfig:
    """Configuration of one :class:`STULayer`; field names match the ``STU`` proto message.

    Defaults follow generative-recommenders / TorchEasyRec. Sentinels: ``max_attn_len`` None or
    0 -> no window; ``attn_alpha`` None or 0 -> ``1/sqrt(attention_dim)``; ``contextual_seq_len``
    -1 -> 0 for a standalone layer (the transducer substitutes its preprocessor's prefix);
    ``scaling_seqlen`` -1 -> the batch ``max_seq_len``; ``fp8_quant_mode`` -1 -> off.
    """

    embedding_dim: int
    num_heads: int
    hidden_dim: int
    attention_dim: int
    output_dropout_ratio: float = 0.3
    causal: bool = True
    target_aware: bool = True
    max_attn_len: Optional[int] = None
    attn_alpha: Optional[float] = None
    use_group_norm: bool = False
    recompute_normed_x: bool = True
    recompute_uvqk: bool = True
    recompute_y: bool = True
    sort_by_length: bool = True
    contextual_seq_len: int = 0
    sla_k1: int = 0
    sla_k2: int = 0
    scaling_seqlen: int = -1
    fp8_quant_mode: int = -1

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "num_heads", "hidden_dim", "attention_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not 0.0 <= self.output_dropout_ratio < 1.0:
            raise ValueError(f"output_dropout_ratio must be in [0, 1); got {self.output_dropout_ratio}")
        if self.contextual_seq_len < -1:
            raise ValueError(f"contextual_seq_len must be >= 0 or -1 (unset); got {self.contextual_seq_len}")

    @property
    def alpha(self) -> float:
        return self.attn_alpha if self.attn_alpha else 1.0 / math.sqrt(self.attention_dim)

    def attention_options(self) -> AttentionOptions:
        return AttentionOptions(
            causal=self.causal,
            max_attn_len=self.max_attn_len or 0,
            contextual_seq_len=max(self.contextual_seq_len, 0),
            sla_k1=self.sla_k1,
            sla_k2=self.sla_k2,
            scaling_seqlen=self.scaling_seqlen,
            fp8_quant_mode=self.fp8_quant_mode,
        )


class STULayer(nn.Module):
    """One HSTU layer on jagged embeddings.

    Args:
        embedding_dim: model dim ``d``.
        num_heads: ``H``.
        hidden_dim: per-head dim of u and v.
        attention_dim: per-head dim of q and k.
        kernel: attention kernel (:class:`HSTUKernel` or name); ``AUTO`` picks per device.
        **config: the other :class:`STULayerConfig` fields (``output_dropout_ratio``, ``causal``,
            ``target_aware``, ``max_attn_len``, ``attn_alpha``, ``use_group_norm``,
            ``recompute_*``, ``sort_by_length``, ``contextual_seq_len``, ``sla_k1``, ``sla_k2``,
            ``scaling_seqlen``, ``fp8_quant_mode``).

    Example::

        >>> layer = STULayer(embedding_dim=16, num_heads=2, hidden_dim=8, attention_dim=8)
        >>> x = torch.randn(5, 16)
        >>> layer(x, x_offsets=torch.tensor([0, 2, 5]), max_seq_len=3).shape
        torch.Size([5, 16])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        hidden_dim: int,
        attention_dim: int,
        kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
        **config: Any,
    ) -> None:
        super().__init__()
        unknown = set(config) - {f.name for f in dataclasses.fields(STULayerConfig)}
        if unknown:
            raise TypeError(f"STULayer got unknown arguments {sorted(unknown)}")
        self.config = STULayerConfig(
            embedding_dim=embedding_dim,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            attention_dim=attention_dim,
            **config,
        )
        self.kernel = to_kernel(kernel)
        self.attention_options = self.config.attention_options()
        uvqk_width = (2 * hidden_dim + 2 * attention_dim) * num_heads
        self.uvqk_weight = nn.Parameter(torch.empty(embedding_dim, uvqk_width))
        self.uvqk_beta = nn.Parameter(torch.zeros(uvqk_width))
        self.input_norm_weight = nn.Parameter(torch.ones(embedding_dim))
        self.input_norm_bias = nn.Parameter(torch.zeros(embedding_dim))
        self.output_weight = nn.Parameter(torch.empty(3 * hidden_dim * num_heads, embedding_dim))
        norm_dim = num_heads if self.config.use_group_norm else hidden_dim * num_heads
        self.output_norm_weight = nn.Parameter(torch.ones(norm_dim))
        self.output_norm_bias = nn.Parameter(torch.zeros(norm_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.uvqk_weight)
        nn.init.zeros_(self.uvqk_beta)
        nn.init.ones_(self.input_norm_weight)
        nn.init.zeros_(self.input_norm_bias)
        nn.init.xavier_uniform_(self.output_weight)
        nn.init.ones_(self.output_norm_weight)
        nn.init.zeros_(self.output_norm_bias)

    @property
    def fp8_quant_mode(self) -> int:
        return self.config.fp8_quant_mode

    def forward(
        self,
        x: torch.Tensor,
        x_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: Optional[torch.Tensor] = None,
        attention_cache: Optional[Dict[str, Any]] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[L, d]`` jagged embeddings.
            x_offsets: ``[B + 1]``.
            max_seq_len: batch maximum length.
            num_targets: optional ``[B]`` trailing targets (ignored unless ``target_aware``).
            attention_cache: per-batch cache shared by the layers of a stack.

        Returns:
            ``[L, d]``.
        """
        cfg = self.config
        u, attn, _, _ = hstu_preprocess_and_attention(
            x,
            self.input_norm_weight,
            self.input_norm_bias,
            STU_NORM_EPS,
            cfg.num_heads,
            cfg.attention_dim,
            cfg.hidden_dim,
            self.uvqk_weight,
            self.uvqk_beta,
            max_seq_len,
            x_offsets,
            cfg.alpha,
            self.attention_options,
            num_targets=num_targets if cfg.target_aware else None,
            kernel=self.kernel,
            recompute_normed_x=cfg.recompute_normed_x,
            recompute_uvqk=cfg.recompute_uvqk,
            cache=attention_cache,
        )
        return hstu_compute_output(
            attn,
            u,
            x,
            self.output_norm_weight,
            self.output_norm_bias,
            STU_NORM_EPS,
            self.output_weight,
            cfg.num_heads,
            cfg.hidden_dim,
            cfg.output_dropout_ratio,
            self.training,
            use_group_norm=cfg.use_group_norm,
            recompute_y=cfg.recompute_y,
        )

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"embedding_dim={cfg.embedding_dim}, num_heads={cfg.num_heads}, "
            f"hidden_dim={cfg.hidden_dim}, attention_dim={cfg.attention_dim}, "
            f"kernel={self.kernel.value}, options={self.attention_options}"
        )


@dataclasses.dataclass
class STUStackOutput:
    """Output of :class:`STUStack`: embeddings and the (possibly truncated) layout."""

    x: torch.Tensor
    x_offsets: torch.Tensor
    max_seq_len: int
    truncation_plan: Optional[TruncationPlan]


class STUStack(nn.Module):
    """Layers applied in sequence, with optional mid-stack attention truncation.

    Args:
        layers: the STU layers.
        attn_truncation_split_layer: index of the first layer that runs on truncated
            sequences (0: no truncation); must be in ``(0, len(layers))`` when set.
        attn_truncation_tail_len: history tokens kept from that layer on (most recent ones).

    Example::

        >>> stack = STUStack([STULayer(16, 2, 8, 8) for _ in range(2)])
        >>> out = stack(torch.randn(5, 16), torch.tensor([0, 2, 5]), max_seq_len=3)
        >>> out.x.shape
        torch.Size([5, 16])
    """

    def __init__(
        self,
        layers: List[STULayer],
        attn_truncation_split_layer: int = 0,
        attn_truncation_tail_len: int = 0,
    ) -> None:
        super().__init__()
        if len(layers) == 0:
            raise ValueError("STUStack needs at least one layer")
        if attn_truncation_split_layer < 0 or attn_truncation_tail_len < 0:
            raise ValueError(
                "attn_truncation_split_layer and attn_truncation_tail_len must be >= 0; got "
                f"{attn_truncation_split_layer}, {attn_truncation_tail_len}"
            )
        if (attn_truncation_split_layer > 0) != (attn_truncation_tail_len > 0):
            raise ValueError(
                "attn_truncation_split_layer and attn_truncation_tail_len must be set together; got "
                f"attn_truncation_split_layer={attn_truncation_split_layer}, "
                f"attn_truncation_tail_len={attn_truncation_tail_len}"
            )
        if attn_truncation_split_layer > 0 and not attn_truncation_split_layer < len(layers):
            raise ValueError(
                f"attn_truncation_split_layer must be in (0, {len(layers)}) (the number of layers); "
                f"got {attn_truncation_split_layer}"
            )
        self.layers = nn.ModuleList(layers)
        self.attn_truncation_split_layer = attn_truncation_split_layer
        self.attn_truncation_tail_len = attn_truncation_tail_len

    def forward(
        self,
        x: torch.Tensor,
        x_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: Optional[torch.Tensor] = None,
    ) -> STUStackOutput:
        """
        Args:
            x: ``[L, d]``.
            x_offsets: ``[B + 1]``.
            max_seq_len: batch maximum length.
            num_targets: optional ``[B]``.

        Returns:
            :class:`STUStackOutput`; after truncation ``x`` has the new layout.
        """
        plan: Optional[TruncationPlan] = None
        # Masks and length groups depend only on the layout: build once, rebuilt after truncation.
        cache: Dict[str, Any] = {}
        for index, layer in enumerate(self.layers):
            if index > 0 and index == self.attn_truncation_split_layer:
                # Targets are kept whatever the mask options: the transducer splits them off.
                plan = compute_truncation_plan(
                    x_offsets,
                    num_targets,
                    self.attn_truncation_tail_len,
                    contextual_seq_len=layer.attention_options.contextual_seq_len,
                    max_seq_len=max_seq_len,
                )
                x = plan.apply(x)
                x_offsets = plan.new_offsets
                max_seq_len = torch.sym_max(plan.new_max_seq_len, 1)
                cache = {}
            x = layer(x, x_offsets, max_seq_len, num_targets, attention_cache=cache)
        return STUStackOutput(x=x, x_offsets=x_offsets, max_seq_len=max_seq_len, truncation_plan=plan)
