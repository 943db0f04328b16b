"""STU layers: the Sequential Transduction Unit of HSTU and a stack of them.

One layer, on jagged token embeddings ``x: [L, d]``::

    u, v, q, k = split(LayerNorm(x) @ W_uvqk + b);  u = silu(u)   # uvqk_activation="all": all four
    a = hstu_attention(q, k, v)                      # silu(alpha q k^T) / N * mask, then @ v
    out = x + dropout([u, a, u * Norm(a)]) @ W_out
"""

import dataclasses
import logging
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union, cast

import torch
from torch import nn

from torchrec_hstu.modules.kv_cache import (
    DeltaStepStats,
    STULayerKVCache,
    STUStackKVCache,
    _param_fingerprint,
    check_append_targets,
    check_delta_batch_sync,
    check_delta_step,
    check_layer_cache,
    check_prefill,
    resolve_delta_offsets,
)
from torchrec_hstu.ops.common import (
    AttentionOptions,
    HSTUKernel,
    JaggedBatchFacts,
    check_jagged_batch_sync,
    check_stu_dims,
    to_kernel,
)
from torchrec_hstu.ops.delta_attention import delta_hstu_attention
from torchrec_hstu.ops.hstu_compute import (
    hstu_compute_output,
    hstu_compute_uqvk,
    hstu_preprocess_and_attention,
)
from torchrec_hstu.ops.jagged import concat_2D_jagged
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
    ``min_full_attn_seq_len`` (generative-recommenders' option; not a proto field): with a window,
    the last this-many history ids attend to the full history. ``uvqk_activation``: ``"u"`` (silu
    on u only: GR's production STU) or ``"all"`` (silu on u, v, q and k: GR's research HSTU).
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
    contextual_seq_len: int = 0
    sla_k1: int = 0
    sla_k2: int = 0
    min_full_attn_seq_len: int = 0
    scaling_seqlen: int = -1
    fp8_quant_mode: int = -1
    uvqk_activation: str = "u"

    def __post_init__(self) -> None:
        check_stu_dims(self.embedding_dim, self.num_heads, self.hidden_dim, self.attention_dim,
                       self.output_dropout_ratio, self.contextual_seq_len, self.attn_alpha,
                       self.uvqk_activation)
        self.attention_options()  # the attention rules live in AttentionOptions (raises ValueError)

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
            min_full_attn_seq_len=self.min_full_attn_seq_len,
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
            ``recompute_*``, ``contextual_seq_len``, ``sla_k1``, ``sla_k2``,
            ``scaling_seqlen``, ``fp8_quant_mode``, ``uvqk_activation``).

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
        batch_facts: Optional[JaggedBatchFacts] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[L, d]`` jagged embeddings.
            x_offsets: ``[B + 1]``.
            max_seq_len: batch maximum length.
            num_targets: optional ``[B]`` trailing targets (ignored unless ``target_aware``).
            attention_cache: per-batch cache shared by the layers of a stack.
            batch_facts: the batch's facts from the caller's edge check
                (:func:`~torchrec_hstu.ops.common.check_jagged_batch_sync`): nothing is read
                from the device then. None: the layer is the edge and checks the values (one
                host sync).

        Returns:
            ``[L, d]``.
        """
        targets = num_targets if self.config.target_aware else None
        if batch_facts is None:
            check_jagged_batch_sync(x_offsets, x.shape[0], max_seq_len, targets)
        u, attn, _, _ = self._attend(x, x_offsets, max_seq_len, targets, attention_cache)
        return self._output(attn, u, x)

    def _projection(
        self,
    ) -> Tuple[torch.Tensor, torch.Tensor, float, int, int, int, torch.Tensor, torch.Tensor]:
        """The input norm and u/v/q/k projection arguments of :func:`hstu_compute_uqvk` after ``x``."""
        cfg = self.config
        return (
            self.input_norm_weight,
            self.input_norm_bias,
            STU_NORM_EPS,
            cfg.num_heads,
            cfg.attention_dim,
            cfg.hidden_dim,
            self.uvqk_weight,
            self.uvqk_beta,
        )

    def _attend(
        self,
        x: torch.Tensor,
        x_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: Optional[torch.Tensor],
        attention_cache: Optional[Dict[str, Any]],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, u/v/q/k projection and attention: ``(u, attn, k, v)``; the batch's
        values were checked by the caller (no host read here)."""
        cfg = self.config
        return hstu_preprocess_and_attention(
            x,
            *self._projection(),
            max_seq_len,
            x_offsets,
            cfg.alpha,
            self.attention_options,
            num_targets=num_targets,
            kernel=self.kernel,
            recompute_normed_x=cfg.recompute_normed_x,
            recompute_uvqk=cfg.recompute_uvqk,
            cache=attention_cache,
            check_values=False,
            uvqk_activation=cfg.uvqk_activation,
        )

    # ---------------------------------------------------------------- KV-cached inference

    def prefill(
        self,
        x: torch.Tensor,
        x_offsets: torch.Tensor,
        max_seq_len: int,
        attention_cache: Optional[Dict[str, Any]] = None,
        batch_facts: Optional[JaggedBatchFacts] = None,
    ) -> Tuple[torch.Tensor, STULayerKVCache]:
        """Forward on the cached prefixes, keeping their keys and values for delta steps.

        The prefixes are history (and the contextual prefix): no targets. Their outputs equal
        the full forward's prefix rows, since no prefix token sees a later token.

        Args:
            x: ``[Lc, d]`` prefix embeddings.
            x_offsets: ``[B + 1]``.
            max_seq_len: batch maximum of the *full* lengths (prefix + later delta tokens) the
                cache serves; with ``scaling_seqlen=-1`` it divides this and every later step.
            attention_cache: per-batch cache shared by the layers of a stack.
            batch_facts: the prefixes' facts from the caller's edge check (None: checked here,
                one host sync).

        Returns:
            ``(out [Lc, d], STULayerKVCache)``.
        """
        if batch_facts is None:
            batch_facts = check_jagged_batch_sync(x_offsets, x.shape[0], max_seq_len)
        check_prefill(self.attention_options, batch_facts)
        u, attn, k, v = self._attend(x, x_offsets, max_seq_len, None, attention_cache)
        out = self._output(attn, u, x)
        kv_cache = STULayerKVCache(
            k=k.detach(),
            v=v.detach(),
            offsets=x_offsets.to(torch.int64),
            max_seq_len=max_seq_len,
            options=self.attention_options,
            layer_id=id(self),
            fingerprint=_param_fingerprint(self),
        )
        return out, kv_cache

    def cached_forward(
        self,
        delta_x: torch.Tensor,
        kv_cache: STULayerKVCache,
        *,
        prefix_offsets: torch.Tensor,
        delta_offsets: Optional[torch.Tensor] = None,
        num_targets: Optional[torch.Tensor] = None,
        append: bool = False,
    ) -> Tuple[torch.Tensor, STULayerKVCache]:
        """Run only the new tokens against the cached keys/values.

        Equals the last ``d_b`` rows of :meth:`forward` on ``[prefix | delta]`` with
        ``max_seq_len=kv_cache.max_seq_len`` (see :mod:`torchrec_hstu.modules.kv_cache` for
        what is refused to keep that true). The step's values are checked with one host read.

        Args:
            delta_x: ``[L', d]`` embeddings of the new tokens (``d_b`` per sequence).
            kv_cache: from :meth:`prefill` (or a previous appending step) of this layer.
            prefix_offsets: ``[B + 1]`` offsets of the prefix the caller expects the cache to
                hold; ``ValueError`` if the cache belongs to another batch.
            delta_offsets: ``[B + 1]`` offsets of ``delta_x``; default ``L' / B`` per sequence.
            num_targets: optional ``[B]`` trailing targets of the full sequences (all inside the
                delta); None: the delta tokens are history.
            append: return a cache with the delta tokens appended (history only).

        Returns:
            ``(out [L', d], cache)``: the cache is ``kv_cache`` itself unless ``append``.
        """
        check_layer_cache(self, kv_cache, delta_x)
        delta_offsets, stats = check_delta_batch_sync(
            kv_cache.offsets, prefix_offsets, "STULayerKVCache", delta_x, delta_offsets, num_targets, append
        )
        check_delta_step(
            self.attention_options,
            stats,
            kv_cache.max_seq_len,
            targets_passed=num_targets is not None and self.config.target_aware,
            append=append,
        )
        return self._cached_step(delta_x, kv_cache, delta_offsets, num_targets, append)

    def _cached_step(
        self,
        delta_x: torch.Tensor,
        kv_cache: STULayerKVCache,
        delta_offsets: torch.Tensor,
        num_targets: Optional[torch.Tensor],
        append: bool,
    ) -> Tuple[torch.Tensor, STULayerKVCache]:
        """:meth:`cached_forward` after its checks (no host read)."""
        cfg = self.config
        u, q, k, v = hstu_compute_uqvk(
            delta_x,
            *self._projection(),
            recompute_normed_x=cfg.recompute_normed_x,
            recompute_uvqk=cfg.recompute_uvqk,
            uvqk_activation=cfg.uvqk_activation,
        )
        full_offsets = kv_cache.offsets + delta_offsets
        full_k = concat_2D_jagged(kv_cache.k, k, kv_cache.offsets, delta_offsets)
        full_v = concat_2D_jagged(kv_cache.v, v, kv_cache.offsets, delta_offsets)
        attn = delta_hstu_attention(
            q,
            full_k,
            full_v,
            full_offsets,
            kv_cache.max_seq_len,
            cfg.alpha,
            self.attention_options,
            num_targets=num_targets if cfg.target_aware else None,
            delta_offsets=delta_offsets,
            kernel=self.kernel,
            check_values=False,
        )
        out = self._output(attn.reshape(-1, cfg.num_heads * cfg.hidden_dim), u, delta_x)
        return out, (kv_cache.appended(full_k, full_v, full_offsets) if append else kv_cache)

    def _output(self, attn: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
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
            + ("" if cfg.uvqk_activation == "u" else f", uvqk_activation={cfg.uvqk_activation!r}")
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

    @classmethod
    def uniform(
        cls,
        stu: Dict[str, Any],
        num_layers: int,
        contextual_seq_len: int = 0,
        attn_truncation_split_layer: int = 0,
        attn_truncation_tail_len: int = 0,
        kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
    ) -> "STUStack":
        """``num_layers`` identical layers from one :class:`STULayer` kwargs dict (the ``STU``
        message's fields); ``stu["contextual_seq_len"]`` -1 (or missing) takes
        ``contextual_seq_len``, the transducer preprocessor's prefix.

        Example::

            >>> stack = STUStack.uniform(dict(embedding_dim=16, num_heads=2, hidden_dim=8, attention_dim=8), 3)
            >>> len(stack.layers)
            3
        """
        stu = dict(stu)
        if stu.get("contextual_seq_len", -1) < 0:
            stu["contextual_seq_len"] = contextual_seq_len
        layers = [STULayer(kernel=kernel, **stu) for _ in range(num_layers)]
        return cls(layers, attn_truncation_split_layer, attn_truncation_tail_len)

    def forward(
        self,
        x: torch.Tensor,
        x_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: Optional[torch.Tensor] = None,
        batch_facts: Optional[JaggedBatchFacts] = None,
    ) -> STUStackOutput:
        """
        Args:
            x: ``[L, d]``.
            x_offsets: ``[B + 1]``.
            max_seq_len: batch maximum length.
            num_targets: optional ``[B]``.
            batch_facts: the batch's facts from the caller's edge check
                (:func:`~torchrec_hstu.ops.common.check_jagged_batch_sync` with these offsets,
                ``max_seq_len`` and ``num_targets``): no layer reads the device then. None: the
                stack is the edge and checks the values here (one host sync).

        Returns:
            :class:`STUStackOutput`; after truncation ``x`` has the new layout.
        """
        if batch_facts is None:
            batch_facts = check_jagged_batch_sync(x_offsets, x.shape[0], max_seq_len, num_targets)

        def run(layer: STULayer, x: torch.Tensor, offsets: torch.Tensor, max_len: int, facts, cache) -> torch.Tensor:
            return layer(x, offsets, max_len, num_targets, attention_cache=cache, batch_facts=facts)

        return self._run_layers(run, x, x_offsets, max_seq_len, num_targets, batch_facts, truncated_max=True)

    def _run_layers(
        self,
        run: Callable[..., torch.Tensor],
        x: torch.Tensor,
        x_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: Optional[torch.Tensor],
        facts: Optional[JaggedBatchFacts],
        truncated_max: bool,
    ) -> STUStackOutput:
        """The layer loop of :meth:`forward` and :meth:`prefill`: ``run(layer, x, offsets,
        max_seq_len, facts, attention_cache)`` per layer, truncating at the split layer.

        The truncation plan comes from the host ``facts`` (None only while tracing), so
        nothing is read from the device. With ``truncated_max`` the layers after the split get
        the truncated batch maximum, else ``max_seq_len`` (prefill: the cache's divisor).
        """
        plan: Optional[TruncationPlan] = None
        # Masks and length groups depend only on the layout: build once, rebuilt after truncation.
        cache: Dict[str, Any] = {}
        for index, layer in enumerate(cast(Iterable[STULayer], self.layers)):
            if index > 0 and index == self.attn_truncation_split_layer:
                # Targets are kept whatever the mask options: the transducer splits them off.
                plan = compute_truncation_plan(
                    x_offsets,
                    num_targets,
                    self.attn_truncation_tail_len,
                    contextual_seq_len=layer.attention_options.contextual_seq_len,
                    max_seq_len=max_seq_len,
                    facts=facts,
                )
                x = plan.apply(x)
                x_offsets = plan.new_offsets
                facts = plan.new_facts
                if truncated_max:
                    max_seq_len = torch.sym_max(plan.new_max_seq_len, 1)
                cache = {}
            x = run(layer, x, x_offsets, max_seq_len, facts, cache)
        return STUStackOutput(x=x, x_offsets=x_offsets, max_seq_len=max_seq_len, truncation_plan=plan)

    # ---------------------------------------------------------------- KV-cached inference

    def prefill(
        self,
        x: torch.Tensor,
        x_offsets: torch.Tensor,
        max_seq_len: int,
        batch_key: Optional[torch.Tensor] = None,
        batch_facts: Optional[JaggedBatchFacts] = None,
    ) -> Tuple[STUStackOutput, STUStackKVCache]:
        """Encode cached prefixes (history, no targets) and return every layer's keys/values.

        Args:
            x: ``[Lc, d]`` prefix embeddings.
            x_offsets: ``[B + 1]``.
            max_seq_len: batch maximum of the full lengths (prefix + later delta tokens).
            batch_key: optional tensor (e.g. user ids ``[B]``) every delta step must repeat.
            batch_facts: the prefixes' facts from the caller's edge check (None: checked here,
                one host sync).

        Returns:
            ``(STUStackOutput of the prefixes, STUStackKVCache)``.

        Example::

            >>> stack = STUStack([STULayer(16, 2, 8, 8, output_dropout_ratio=0.0) for _ in range(2)])
            >>> prefix_offsets = torch.tensor([0, 3, 7])
            >>> with torch.no_grad():
            ...     _, cache = stack.prefill(torch.randn(7, 16), prefix_offsets, max_seq_len=6)
            ...     out, _ = stack.cached_forward(torch.randn(4, 16), cache, prefix_offsets=prefix_offsets,
            ...                                   num_targets=torch.tensor([2, 2]))
            >>> out.shape
            torch.Size([4, 16])
        """
        split = self.attn_truncation_split_layer
        if split > 0:
            fixed = [layer.attention_options.scaling_seqlen > 0 for layer in cast(Iterable[STULayer], self.layers[split:])]
            if not all(fixed):
                raise ValueError(
                    "the KV-cached path with attention truncation needs a fixed scaling_seqlen (> 0) in every "
                    f"layer from attn_truncation_split_layer={split} on: with -1 their divisor is the truncated "
                    "batch maximum, which depends on the candidates not yet known at prefill"
                )
        if batch_facts is None:
            batch_facts = check_jagged_batch_sync(x_offsets, x.shape[0], max_seq_len)
        layer_caches: List[STULayerKVCache] = []

        def run(layer: STULayer, x: torch.Tensor, offsets: torch.Tensor, max_len: int, facts, cache) -> torch.Tensor:
            out, layer_cache = layer.prefill(x, offsets, max_len, attention_cache=cache, batch_facts=facts)
            layer_caches.append(layer_cache)
            return out

        output = self._run_layers(run, x, x_offsets, max_seq_len, None, batch_facts, truncated_max=False)
        kv_cache = STUStackKVCache(
            layers=tuple(layer_caches),
            offsets=x_offsets.to(torch.int64),
            max_seq_len=max_seq_len,
            stack_id=id(self),
            batch_key=None if batch_key is None else batch_key.detach().clone(),
            truncated=split > 0,
        )
        return output, kv_cache

    def cached_forward(
        self,
        delta_x: torch.Tensor,
        kv_cache: STUStackKVCache,
        *,
        prefix_offsets: torch.Tensor,
        delta_offsets: Optional[torch.Tensor] = None,
        num_targets: Optional[torch.Tensor] = None,
        append: bool = False,
        batch_key: Optional[torch.Tensor] = None,
        step_stats: Optional[DeltaStepStats] = None,
    ) -> Tuple[torch.Tensor, STUStackKVCache]:
        """Run only the new tokens through every layer against the cache.

        Equals the last ``d_b`` rows of :meth:`forward` on ``[prefix | delta]`` with
        ``max_seq_len=kv_cache.max_seq_len`` (refusals: :mod:`torchrec_hstu.modules.kv_cache`).
        The step's values (prefix offsets, ``batch_key``, delta offsets, ``num_targets``) are
        read once, unless the caller passes them as ``step_stats``.

        Args:
            delta_x: ``[L', d]`` new tokens (``d_b`` per sequence).
            kv_cache: from :meth:`prefill` (or a previous appending step) of this stack.
            prefix_offsets: ``[B + 1]`` offsets of the prefix the caller expects the cache to
                hold (the ones given to :meth:`prefill`, or after appends the returned cache's
                ``offsets``); ``ValueError`` if the cache belongs to another batch.
            delta_offsets: ``[B + 1]`` offsets of ``delta_x``; default ``L' / B`` per sequence.
            num_targets: optional ``[B]`` trailing targets (all inside the delta); None: the
                delta tokens are history.
            append: return a cache with the delta appended (history only, no truncation).
            batch_key: must equal the prefill's ``batch_key`` when one was given.
            step_stats: the step's facts from the caller's edge check
                (:func:`~torchrec_hstu.modules.kv_cache.delta_step_stats_sync` over
                ``kv_cache.offsets`` and these ``delta_offsets`` / ``num_targets``, having
                checked the batch identity itself): nothing is read here then.

        Returns:
            ``(out [L', d], cache)``: the cache is ``kv_cache`` itself unless ``append``.
        """
        if not isinstance(kv_cache, STUStackKVCache):
            raise ValueError(f"kv_cache must be an STUStackKVCache (from STUStack.prefill); got {type(kv_cache)}")
        if kv_cache.stack_id != id(self) or len(kv_cache.layers) != len(self.layers):
            raise ValueError("kv_cache was built by another STUStack; pass the cache this stack's prefill returned")
        if step_stats is None:
            delta_offsets, step_stats = check_delta_batch_sync(
                kv_cache.offsets, prefix_offsets, "STUStackKVCache", delta_x, delta_offsets, num_targets, append,
                kv_cache.batch_key, batch_key,
            )
        else:
            check_append_targets(num_targets, append)
            delta_offsets = resolve_delta_offsets(delta_x, delta_offsets, kv_cache.batch_size)
        for layer, layer_cache in zip(cast(Iterable[STULayer], self.layers), kv_cache.layers):
            check_layer_cache(layer, layer_cache, delta_x)
            check_delta_step(
                layer.attention_options,
                step_stats,
                kv_cache.max_seq_len,
                targets_passed=num_targets is not None and layer.config.target_aware,
                append=append,
                truncated=kv_cache.truncated,
            )
        x = delta_x
        new_layers: List[STULayerKVCache] = []
        for layer, layer_cache in zip(cast(Iterable[STULayer], self.layers), kv_cache.layers):
            x, new_cache = layer._cached_step(x, layer_cache, delta_offsets, num_targets, append)
            new_layers.append(new_cache)
        if not append:
            return x, kv_cache
        return x, dataclasses.replace(kv_cache, layers=tuple(new_layers), offsets=kv_cache.offsets + delta_offsets)
