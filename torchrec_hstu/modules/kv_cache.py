"""KV cache for incremental HSTU inference: explicit cache state and a transducer-level API.

Serving pattern (both anchors): encode a user's history once (*prefill*), keep every STU
layer's keys and values of it, then run only the new tokens (*delta*: candidates to score, or
new history events to append) against the cache. Symbols: ``B`` users, ``Lc`` cached tokens,
``L'`` delta tokens, ``H`` heads, ``Dqk``/``Dv`` head dims, ``d`` the model dim.

The state is a value, never hidden module state: :meth:`STULayer.prefill
<torchrec_hstu.modules.stu.STULayer.prefill>` / :meth:`STUStack.prefill
<torchrec_hstu.modules.stu.STUStack.prefill>` return a cache object and ``cached_forward``
takes one and returns the (possibly appended) next one. A cache is checked on every use and
refuses, with ``ValueError``, to serve

* another batch: the caller passes the prefix offsets it expects (``prefix_offsets``) and,
  optionally, a ``batch_key`` (e.g. user ids); both must equal what the cache was built with;
* another module or changed weights: each layer cache records the layer's identity, its
  attention options and the version counters / storage of its parameters;
* sequences longer than the ``max_seq_len`` it was prefilled for (that value is the attention
  divisor when ``scaling_seqlen=-1``, so a longer batch would divide by something else).

Exactness: a delta step equals the last rows of the full forward whenever no cached token's
output depends on a delta token. That holds for candidates (the delta tokens are exactly the
trailing ``num_targets`` targets) under every mask option, and for appended history under
causal rules only. So these are refused: ``causal=False``; targets inside the cached prefix
(``num_targets > delta``); delta tokens that are history (appends, or ``num_targets < delta``)
when the generative-recommenders contextual rule (``contextual_seq_len > 0`` without SLA: the
prefix sees all history) or ``min_full_attn_seq_len`` with a window (which rows are "full"
moves with the history end) is on, or when the stack truncates attention mid-stack (the kept
history moves). SLA is causal and supported for both. Truncation is supported for candidates
when every layer after the split has a fixed ``scaling_seqlen``.

FP8: the delta attention follows the "delta-q" quantization rule (see
:mod:`torchrec_hstu.ops.pytorch.delta_attention`); since prefill and delta steps quantize
over what each call sees, FP8 modes 1..5 are not bit-equal to the full FP8 forward (mode 0 is).
"""

import dataclasses
from typing import TYPE_CHECKING, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.ops.common import AttentionOptions, is_tracing
from torchrec_hstu.ops.delta_attention import uniform_delta_offsets
from torchrec_hstu.ops.jagged import concat_2D_jagged, lengths_to_offsets, split_2D_jagged

if TYPE_CHECKING:  # pragma: no cover
    from torchrec_hstu.modules.hstu_transducer import HSTUTransducer

JaggedInput = Union[JaggedTensor, Dict[str, JaggedTensor]]


def _param_fingerprint(module: nn.Module) -> Tuple[Tuple[int, int], ...]:
    """``(storage pointer, version counter)`` per parameter: changes on any in-place update
    (optimizer step, ``load_state_dict``) or re-materialization (``.to()``). Parameters created
    under ``torch.inference_mode()`` have no version counter (and cannot be updated in place
    outside it); their storage pointer alone is recorded."""
    return tuple((p.data_ptr(), -1 if p.is_inference() else p._version) for p in module.parameters())


@dataclasses.dataclass(frozen=True)
class STULayerKVCache:
    """Keys and values of one :class:`~torchrec_hstu.modules.stu.STULayer` for a batch prefix.

    Attributes:
        k: ``[Lc, H, Dqk]`` keys of the cached tokens (detached).
        v: ``[Lc, H, Dv]`` values of the cached tokens (detached).
        offsets: ``[B + 1]`` int64 offsets of the cached tokens.
        max_seq_len: batch maximum of the full lengths (prefix + delta) this cache serves;
            the attention divisor when ``scaling_seqlen=-1``.
        options: the layer's attention options at prefill.
        layer_id: ``id()`` of the layer that built it.
        fingerprint: the layer's parameters at prefill (see :func:`_param_fingerprint`).
    """

    k: torch.Tensor
    v: torch.Tensor
    offsets: torch.Tensor
    max_seq_len: int
    options: AttentionOptions
    layer_id: int
    fingerprint: Tuple[Tuple[int, int], ...]

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    def appended(self, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor) -> "STULayerKVCache":
        """The same cache with new ``k``, ``v``, ``offsets`` (after an append step)."""
        return dataclasses.replace(self, k=k.detach(), v=v.detach(), offsets=offsets)


@dataclasses.dataclass(frozen=True)
class STUStackKVCache:
    """Per-layer caches of one :class:`~torchrec_hstu.modules.stu.STUStack` for a batch.

    Attributes:
        layers: one :class:`STULayerKVCache` per layer (after a truncation split their offsets
            are the truncated ones).
        offsets: ``[B + 1]`` offsets of the cached prefix as given to ``prefill``.
        max_seq_len: batch maximum of the full lengths this cache serves.
        stack_id: ``id()`` of the stack that built it.
        batch_key: optional tensor identifying the batch (e.g. user ids ``[B]``).
        truncated: whether the stack truncates attention mid-stack.
    """

    layers: Tuple[STULayerKVCache, ...]
    offsets: torch.Tensor
    max_seq_len: int
    stack_id: int
    batch_key: Optional[torch.Tensor] = None
    truncated: bool = False

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1


def _same_offsets(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a.to(torch.int64), b.to(torch.int64)))


def check_prefix_offsets(cache_offsets: torch.Tensor, prefix_offsets: torch.Tensor, what: str) -> None:
    """``ValueError`` unless the caller's ``prefix_offsets`` are the cache's (same batch)."""
    if not isinstance(prefix_offsets, torch.Tensor) or prefix_offsets.dim() != 1:
        raise ValueError(
            f"prefix_offsets must be the [B + 1] offsets of the cached prefix; got "
            f"{getattr(prefix_offsets, 'shape', type(prefix_offsets))}"
        )
    if is_tracing():
        return
    if not _same_offsets(cache_offsets, prefix_offsets):
        shown = prefix_offsets.tolist()[:16] if prefix_offsets.numel() <= 64 else prefix_offsets.shape
        cached = cache_offsets.tolist()[:16] if cache_offsets.numel() <= 64 else cache_offsets.shape
        raise ValueError(
            f"this {what} was built for another batch: its prefix offsets are {cached}, the caller's "
            f"prefix_offsets are {shown}. Prefill a cache for this batch (caches are per batch)."
        )


def check_batch_key(cache_key: Optional[torch.Tensor], batch_key: Optional[torch.Tensor]) -> None:
    """``ValueError`` unless both keys are None or equal."""
    if cache_key is None and batch_key is None:
        return
    if cache_key is None or batch_key is None:
        raise ValueError(
            "batch_key must be given both at prefill and at every delta step (or never); got "
            f"{'none' if cache_key is None else 'one'} at prefill and "
            f"{'none' if batch_key is None else 'one'} now"
        )
    if is_tracing():
        return
    if cache_key.shape != batch_key.shape or not torch.equal(cache_key.to(batch_key.device), batch_key):
        raise ValueError("batch_key differs from the one the cache was prefilled with: this cache belongs to another batch")


def check_layer_cache(layer: nn.Module, cache: STULayerKVCache, x: torch.Tensor) -> None:
    """``ValueError`` if ``cache`` was not built by ``layer`` with its current weights/options."""
    if not isinstance(cache, STULayerKVCache):
        raise ValueError(f"kv_cache must be an STULayerKVCache (from STULayer.prefill); got {type(cache)}")
    if cache.layer_id != id(layer):
        raise ValueError("kv_cache was built by another STULayer; pass the cache this layer's prefill returned")
    if cache.options != layer.attention_options:
        raise ValueError(
            f"the layer's attention options changed since prefill ({cache.options} -> "
            f"{layer.attention_options}); prefill again"
        )
    if cache.fingerprint != _param_fingerprint(layer):
        raise ValueError("the layer's parameters changed since prefill (stale keys/values); prefill again")
    if x.dtype != cache.k.dtype or x.device != cache.k.device:
        raise ValueError(
            f"delta_x must have the cache's dtype/device ({cache.k.dtype}, {cache.k.device}); got "
            f"{x.dtype}, {x.device}"
        )


def history_delta_allowed(options: AttentionOptions) -> bool:
    """Whether delta tokens may be history (appends, or ``num_targets < delta``) exactly:
    no cached token's output may depend on a later history token."""
    gr_contextual = not options.use_sla and options.contextual_seq_len > 0
    moving_full_rows = options.max_attn_len > 0 and options.min_full_attn_seq_len > 0
    return not (gr_contextual or moving_full_rows)


def resolve_delta_offsets(
    delta_x: torch.Tensor, delta_offsets: Optional[torch.Tensor], batch_size: int
) -> torch.Tensor:
    """``delta_offsets`` as int64 ``[B + 1]`` (``L' / B`` per sequence when None)."""
    if delta_x.dim() != 2:
        raise ValueError(f"delta_x must be [L', d]; got shape {tuple(delta_x.shape)}")
    if delta_offsets is None:
        return uniform_delta_offsets(batch_size, delta_x.shape[0], delta_x.device)
    if delta_offsets.dim() != 1 or delta_offsets.numel() != batch_size + 1:
        raise ValueError(
            f"delta_offsets must be [B + 1] = [{batch_size + 1}] like the cache's offsets; got "
            f"{tuple(delta_offsets.shape)}"
        )
    return delta_offsets.to(torch.int64)


class DeltaStepStats(NamedTuple):
    """Host-side facts about one delta step (read with one sync by :func:`delta_step_stats`).

    Attributes:
        longest: longest full sequence (prefix + delta).
        targets_in_prefix: ``max(num_targets - delta)`` (> 0: some target is in the prefix).
        history_in_delta: ``max(delta - num_targets)`` (> 0: some delta token is history).
        longest_delta: ``max(delta)`` (the history count when targets are not passed on).
    """

    longest: int
    targets_in_prefix: int
    history_in_delta: int
    longest_delta: int


def delta_step_stats(
    cache_offsets: torch.Tensor, delta_offsets: torch.Tensor, num_targets: Optional[torch.Tensor]
) -> Optional[DeltaStepStats]:
    """:class:`DeltaStepStats` of a step (one host sync); None while tracing or for ``B == 0``."""
    if is_tracing() or cache_offsets.numel() <= 1:
        return None
    prefix = (cache_offsets[1:] - cache_offsets[:-1]).to(torch.int64)
    deltas = (delta_offsets[1:] - delta_offsets[:-1]).to(torch.int64)
    if num_targets is not None and (num_targets.dim() != 1 or num_targets.numel() != deltas.numel()):
        raise ValueError(f"num_targets must be [B]=[{deltas.numel()}]; got {tuple(num_targets.shape)}")
    targets = torch.zeros_like(deltas) if num_targets is None else num_targets.to(deltas.device, torch.int64)
    stats = torch.stack([(prefix + deltas).max(), (targets - deltas).max(), (deltas - targets).max(), deltas.max()])
    return DeltaStepStats(*stats.tolist())


def check_delta_step(
    options: AttentionOptions,
    stats: Optional[DeltaStepStats],
    max_seq_len: int,
    targets_passed: bool,
    append: bool,
    truncated: bool = False,
) -> None:
    """Refuse delta steps whose result would differ from the full forward (module docstring).

    Args:
        options: the layer's attention options.
        stats: from :func:`delta_step_stats` (None: value checks skipped).
        max_seq_len: the cache's ``max_seq_len``.
        targets_passed: the layer passes ``num_targets`` to attention (given and target-aware);
            otherwise every delta token is history to it.
        append: the step appends the delta to the cache.
        truncated: the stack truncates attention mid-stack.
    """
    if not options.causal:
        raise ValueError("the KV-cached path needs causal attention (causal=True): with causal=False "
                         "cached tokens would attend to the new ones")
    if append and truncated:
        raise ValueError("append=True is not supported with attention truncation: the kept history window "
                         "moves as history grows; prefill again instead")
    history_ok = history_delta_allowed(options) and not truncated
    if append and not history_ok:
        raise ValueError(
            "append=True is exact only under causal masks; refused with "
            f"contextual_seq_len={options.contextual_seq_len} (the contextual prefix sees all history) or "
            f"min_full_attn_seq_len={options.min_full_attn_seq_len} with max_attn_len={options.max_attn_len}; "
            "prefill again with the longer history instead"
        )
    if stats is None:
        return
    if stats.longest > max_seq_len:
        raise ValueError(
            f"the sequences reach {stats.longest} tokens with this delta but the cache was prefilled with "
            f"max_seq_len={max_seq_len} (the attention divisor when scaling_seqlen=-1); prefill with "
            "max_seq_len >= the longest full sequence"
        )
    if targets_passed and stats.targets_in_prefix > 0:
        raise ValueError(
            "num_targets exceeds the delta length for some sequence: targets inside the cached prefix were "
            "encoded as history at prefill; the delta must hold every target"
        )
    history = stats.history_in_delta if targets_passed else stats.longest_delta
    if history > 0 and not history_ok:
        raise ValueError(
            "the delta holds history tokens (num_targets < delta length, num_targets=None, or a layer with "
            "target_aware=False), which is exact only under causal masks; refused with "
            f"contextual_seq_len={options.contextual_seq_len}, min_full_attn_seq_len="
            f"{options.min_full_attn_seq_len} (max_attn_len={options.max_attn_len}), truncation={truncated}. "
            "Make the delta exactly the targets."
        )


def check_append_targets(num_targets: Optional[torch.Tensor], append: bool) -> None:
    """``append=True`` stores the delta as history, so it takes no ``num_targets``."""
    if append and num_targets is not None:
        raise ValueError(
            "append=True stores the delta tokens as history; pass num_targets=None (score candidates "
            "with append=False)"
        )


def check_prefill(options: AttentionOptions, prefix_offsets: torch.Tensor) -> None:
    """Refuse prefills the cached path cannot continue exactly."""
    if not options.causal:
        raise ValueError("the KV-cached path needs causal attention (causal=True)")
    c = options.contextual_seq_len
    if c > 0 and not options.use_sla and not is_tracing() and prefix_offsets.numel() > 1:
        shortest = int((prefix_offsets[1:] - prefix_offsets[:-1]).min())
        if shortest < c:
            raise ValueError(
                f"every cached prefix must hold the whole contextual prefix (contextual_seq_len={c}); "
                f"the shortest has {shortest} tokens"
            )


# ------------------------------------------------------------------ transducer-level API


@dataclasses.dataclass(frozen=True)
class HSTUKVCache:
    """Cache of an :class:`~torchrec_hstu.modules.HSTUTransducer` for a batch of user histories.

    Attributes:
        stack: the STU stack's cache (offsets include the contextual prefix).
        history_offsets: ``[B + 1]`` offsets of the caller's history tokens.
        max_seq_len: batch maximum of history + candidates (the transducer's ``max_seq_len``,
            before the contextual prefix).
        query_timestamps: ``[B]`` request time the history's time buckets were measured from
            (None without time encoding).
        transducer_id: ``id()`` of the transducer.
    """

    stack: STUStackKVCache
    history_offsets: torch.Tensor
    max_seq_len: int
    query_timestamps: Optional[torch.Tensor]
    transducer_id: int


def _uses_time(transducer: "HSTUTransducer") -> bool:
    encoder = transducer.positional_encoder
    return encoder is not None and encoder.use_time_encoding


def prefill_transducer(
    transducer: "HSTUTransducer",
    history: JaggedInput,
    max_seq_len: int,
    seq_timestamps: Optional[Union[JaggedTensor, torch.Tensor]] = None,
    query_timestamps: Optional[torch.Tensor] = None,
    contextual_embeddings: Optional[torch.Tensor] = None,
    seq_actions: Optional[Union[JaggedTensor, torch.Tensor]] = None,
    batch_key: Optional[torch.Tensor] = None,
) -> HSTUKVCache:
    """Encode user histories once and return their cache (run under ``torch.no_grad()``).

    The history tokens go through the transducer's preprocessor (contextual tokens prepended),
    positional encoder and STU stack exactly as in a full forward of ``[history | candidates]``:
    position indices count back from the end of the history either way, and time buckets are
    measured from ``query_timestamps`` (the timestamp the last candidate will carry).

    Args:
        transducer: the model (``eval()`` mode for deterministic outputs).
        history: ``JaggedTensor`` ``[Lh, D_in]`` of ``B`` histories (or an
            ``EmbeddingCollection`` output dict).
        max_seq_len: batch maximum of history + candidates over the candidate sets this cache
            will score (the ``max_seq_len`` a full forward would get).
        seq_timestamps: ``[Lh]`` history timestamps (needed with time encoding).
        query_timestamps: ``[B]`` request time per user (needed with time encoding).
        contextual_embeddings: ``[B, C, F]`` when the preprocessor has contextual tokens.
        seq_actions: ``[Lh]`` action bitmasks when the preprocessor encodes actions.
        batch_key: optional ``[B]`` tensor (e.g. user ids) checked at every scoring step.

    Returns:
        :class:`HSTUKVCache`.

    Example::

        >>> from torchrec_hstu.modules import HSTUTransducer, STULayer, STUStack
        >>> stack = STUStack([STULayer(16, 2, 8, 8, output_dropout_ratio=0.0)])
        >>> model = HSTUTransducer(stack).eval()
        >>> history = JaggedTensor(values=torch.randn(5, 16), lengths=torch.tensor([2, 3]))
        >>> with torch.no_grad():
        ...     cache = prefill_transducer(model, history, max_seq_len=5)
        ...     cands = JaggedTensor(values=torch.randn(4, 16), lengths=torch.tensor([2, 2]))
        ...     scored = score_candidates(model, cands, cache, history_offsets=history.offsets())
        >>> scored.values().shape
        torch.Size([4, 16])
    """
    from torchrec_hstu.modules.hstu_transducer import jagged_values, jagged_values_lengths

    jt = transducer._select(history)
    values, lengths = jagged_values_lengths(jt)
    offsets = lengths_to_offsets(lengths)
    batch_size = offsets.numel() - 1
    timestamps = jagged_values(seq_timestamps)
    if _uses_time(transducer):
        if timestamps is None or query_timestamps is None:
            raise ValueError(
                "with time encoding, prefill_transducer needs seq_timestamps [Lh] and query_timestamps [B] "
                "(the request time: the timestamp of the last candidate; history time buckets count from it)"
            )
        if query_timestamps.shape != (batch_size,):
            raise ValueError(f"query_timestamps must be [B]=[{batch_size}]; got {tuple(query_timestamps.shape)}")
    pre = transducer.preprocess(
        values, offsets, max_seq_len, timestamps, None, contextual_embeddings, jagged_values(seq_actions), "history"
    )
    x = pre.seq_embeddings
    if transducer.positional_encoder is not None:
        # One stand-in "target" per sequence carrying the request time: history positions count
        # back from the history end and time buckets from the request, as in the full forward.
        ones = lengths_to_offsets(torch.ones(batch_size, dtype=torch.int64, device=x.device))
        x_full = concat_2D_jagged(x, x.new_zeros(batch_size, x.shape[1]), pre.seq_offsets, ones)
        ts_full = None
        if pre.seq_timestamps is not None and query_timestamps is not None:
            ts_full = concat_2D_jagged(
                pre.seq_timestamps, query_timestamps.to(pre.seq_timestamps.dtype), pre.seq_offsets, ones
            )
        encoded = transducer.positional_encoder(
            x_full, pre.seq_offsets + ones, ts_full, torch.ones(batch_size, dtype=torch.int64, device=x.device)
        )
        x, _ = split_2D_jagged(encoded, pre.seq_offsets, ones, x.shape[0], batch_size)
    x = transducer.input_dropout(x)
    _, stack_cache = transducer.stu_module.prefill(x, pre.seq_offsets, pre.max_seq_len, batch_key=batch_key)
    return HSTUKVCache(
        stack=stack_cache,
        history_offsets=offsets,
        max_seq_len=max_seq_len,
        query_timestamps=None if query_timestamps is None else query_timestamps.detach().clone(),
        transducer_id=id(transducer),
    )


def score_candidates(
    transducer: "HSTUTransducer",
    candidates: JaggedInput,
    cache: HSTUKVCache,
    history_offsets: torch.Tensor,
    candidate_timestamps: Optional[Union[JaggedTensor, torch.Tensor]] = None,
    candidate_actions: Optional[Union[JaggedTensor, torch.Tensor]] = None,
    batch_key: Optional[torch.Tensor] = None,
) -> JaggedTensor:
    """Encode one candidate set per user against the cached histories; the cache is unchanged.

    Equals ``transducer(history ++ candidates, num_targets=candidate lengths,
    max_seq_len=cache.max_seq_len).candidate_embeddings`` (post-processed), for any number of
    candidate sets scored against one cache.

    Args:
        transducer: the model that built ``cache``.
        candidates: ``JaggedTensor`` ``[Lt, D_in]``, ``T_b`` candidates per user (``T_b >= 0``).
        cache: from :func:`prefill_transducer`.
        history_offsets: ``[B + 1]`` offsets of the histories the caller expects the cache to
            hold (``ValueError`` if they are another batch's).
        candidate_timestamps: ``[Lt]`` (needed with time encoding; each user's last candidate
            must carry the cache's ``query_timestamps``).
        candidate_actions: ``[Lt]`` when the preprocessor encodes actions (targets get the
            target embedding whatever the bits).
        batch_key: must equal the prefill's ``batch_key`` when one was given.

    Returns:
        ``JaggedTensor`` ``[Lt, d]`` of post-processed candidate embeddings, lengths ``T_b``.
    """
    from torchrec_hstu.modules.hstu_transducer import jagged_tensor, jagged_values, jagged_values_lengths

    if not isinstance(cache, HSTUKVCache):
        raise ValueError(f"cache must be an HSTUKVCache from prefill_transducer; got {type(cache)}")
    if cache.transducer_id != id(transducer):
        raise ValueError("cache was built by another HSTUTransducer")
    check_prefix_offsets(cache.history_offsets, history_offsets, "HSTUKVCache")
    jt = transducer._select(candidates)
    values, lengths = jagged_values_lengths(jt)
    offsets = lengths_to_offsets(lengths)
    batch_size = offsets.numel() - 1
    if batch_size != cache.stack.batch_size:
        raise ValueError(
            f"candidates have B={batch_size} sequences but the cache holds {cache.stack.batch_size} users"
        )
    timestamps = jagged_values(candidate_timestamps)
    c = transducer.contextual_seq_len
    if _uses_time(transducer):
        if timestamps is None:
            raise ValueError("with time encoding, score_candidates needs candidate_timestamps [Lt]")
        if not is_tracing() and values.shape[0] > 0:
            last = timestamps[torch.clamp(offsets[1:] - 1, min=0)]
            stale = (lengths > 0) & (last != cache.query_timestamps.to(last.dtype))
            if bool(stale.any()):
                raise ValueError(
                    "each user's last candidate must carry the request time the cache was prefilled with "
                    "(query_timestamps): history time buckets were measured from it; prefill again for a "
                    "new request time"
                )
    contextual = None
    if transducer.input_preprocessor is not None and c > 0:
        # Stand-in contextual tokens (stripped below): they put the candidates at positions >= c.
        contextual = values.new_zeros(batch_size, c, transducer.input_preprocessor.contextual_feature_dim)
    pre = transducer.preprocess(
        values, offsets, cache.max_seq_len, timestamps, lengths, contextual, jagged_values(candidate_actions),
        "candidates",
    )
    x, x_offsets, x_timestamps = pre.seq_embeddings, pre.seq_offsets, pre.seq_timestamps
    if transducer.positional_encoder is not None:
        # Candidates are targets: position index c, time bucket from the last candidate.
        x = transducer.positional_encoder(x, x_offsets, x_timestamps, lengths)
    if c > 0:
        prefix = lengths_to_offsets(torch.full_like(lengths, c))
        _, x = split_2D_jagged(x, prefix, offsets, batch_size * c, values.shape[0])
    x = transducer.input_dropout(x)
    out, _ = transducer.stu_module.cached_forward(
        x,
        cache.stack,
        prefix_offsets=cache.stack.offsets,
        delta_offsets=offsets,
        num_targets=lengths,
        batch_key=batch_key,
    )
    return jagged_tensor(transducer.output_postprocessor(out, timestamps), offsets)
