"""KV cache for incremental HSTU inference: the cache state and its checks.

Serving pattern (both anchors): encode a user's history once (*prefill*), keep every STU
layer's keys and values of it, then run only the new tokens (*delta*: candidates to score, or
new history events to append) against the cache. Symbols: ``B`` users, ``Lc`` cached tokens,
``L'`` delta tokens, ``H`` heads, ``Dqk``/``Dv`` head dims, ``d`` the model dim.

The state is a value, never hidden module state: :meth:`STULayer.prefill
<torchrec_hstu.modules.stu.STULayer.prefill>` / :meth:`STUStack.prefill
<torchrec_hstu.modules.stu.STUStack.prefill>` return a cache object and ``cached_forward``
takes one and returns the (possibly appended) next one; :meth:`HSTUTransducer.prefill
<torchrec_hstu.modules.HSTUTransducer.prefill>` / :meth:`~torchrec_hstu.modules.HSTUTransducer.score_candidates`
do the same for a whole transducer (:class:`HSTUKVCache`). This module holds the cache data and
its checks only; it imports no module that runs layers. A cache is checked on every use (one
host read per step, :func:`delta_step_stats_sync`; nothing per layer) and refuses, with
``ValueError``, to serve

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
from typing import Any, NamedTuple, Optional, Sequence, Tuple, cast

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.modules.jagged_types import JaggedInput
from torchrec_hstu.ops.common import AttentionOptions, JaggedBatchFacts, is_tracing
from torchrec_hstu.ops.delta_attention import uniform_delta_offsets


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


def prefix_offsets_flag(
    cache_offsets: torch.Tensor, prefix_offsets: torch.Tensor, what: str
) -> Optional[torch.Tensor]:
    """Free checks of the caller's ``prefix_offsets`` against the cache's (shape, device:
    ``ValueError`` at once), and the 0-d device flag "the values differ" for the step's single
    read (:func:`delta_step_stats_sync`; :func:`check_prefix_offsets` raises on it). None while
    tracing."""
    if not isinstance(prefix_offsets, torch.Tensor) or prefix_offsets.dim() != 1:
        raise ValueError(
            f"prefix_offsets must be the [B + 1] offsets of the cached prefix; got "
            f"{getattr(prefix_offsets, 'shape', type(prefix_offsets))}"
        )
    if cache_offsets.shape != prefix_offsets.shape or cache_offsets.device != prefix_offsets.device:
        _raise_other_batch(cache_offsets, prefix_offsets, what)
    if is_tracing():
        return None
    return (cache_offsets.to(torch.int64) != prefix_offsets.to(torch.int64)).any()


def _raise_other_batch(cache_offsets: torch.Tensor, prefix_offsets: torch.Tensor, what: str) -> None:
    # The error path may read the device: it shows both offsets.
    shown = prefix_offsets.tolist()[:16] if prefix_offsets.numel() <= 64 else prefix_offsets.shape
    cached = cache_offsets.tolist()[:16] if cache_offsets.numel() <= 64 else cache_offsets.shape
    raise ValueError(
        f"this {what} was built for another batch: its prefix offsets are {cached}, the caller's "
        f"prefix_offsets are {shown}. Prefill a cache for this batch (caches are per batch)."
    )


def check_prefix_offsets(
    stats: Optional["DeltaStepStats"],
    index: int,
    cache_offsets: torch.Tensor,
    prefix_offsets: torch.Tensor,
    what: str,
) -> None:
    """``ValueError`` if flag ``index`` of ``stats`` (from :func:`prefix_offsets_flag`) says
    the caller's ``prefix_offsets`` are not the cache's (another batch)."""
    if stats is not None and stats.flags[index]:
        _raise_other_batch(cache_offsets, prefix_offsets, what)


def batch_key_flag(cache_key: Optional[torch.Tensor], batch_key: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Free checks of ``batch_key`` (given at prefill and now, or never; same shape) and the
    0-d device flag "the keys differ" (None when there are no keys or while tracing)."""
    if cache_key is None and batch_key is None:
        return None
    if cache_key is None or batch_key is None:
        raise ValueError(
            "batch_key must be given both at prefill and at every delta step (or never); got "
            f"{'none' if cache_key is None else 'one'} at prefill and "
            f"{'none' if batch_key is None else 'one'} now"
        )
    if cache_key.shape != batch_key.shape:
        raise ValueError(_OTHER_KEY)
    if is_tracing():
        return None
    return (cache_key.to(batch_key.device) != batch_key).any()


_OTHER_KEY = "batch_key differs from the one the cache was prefilled with: this cache belongs to another batch"


def check_batch_key(stats: Optional["DeltaStepStats"], index: int) -> None:
    """``ValueError`` if flag ``index`` of ``stats`` (from :func:`batch_key_flag`) is set."""
    if stats is not None and stats.flags[index]:
        raise ValueError(_OTHER_KEY)


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
    """Host-side facts about one delta step, read with one sync by :func:`delta_step_stats_sync`.

    Attributes:
        longest: longest full sequence (prefix + delta).
        targets_in_prefix: ``max(num_targets - delta)`` (> 0: some target is in the prefix).
        history_in_delta: ``max(delta - num_targets)`` (> 0: some delta token is history).
        longest_delta: ``max(delta)`` (the history count when targets are not passed on).
        flags: the caller's 0-d device flags read in the same transfer (True: that check failed).
    """

    longest: int
    targets_in_prefix: int
    history_in_delta: int
    longest_delta: int
    flags: Tuple[bool, ...] = ()


def delta_step_stats_sync(
    cache_offsets: torch.Tensor,
    delta_offsets: torch.Tensor,
    total_delta: int,
    num_targets: Optional[torch.Tensor],
    flags: Sequence[Optional[torch.Tensor]] = (),
) -> Optional[DeltaStepStats]:
    """The edge check of a delta step: one host read. None while tracing.

    Checks the values the delta attention would otherwise check per layer: ``delta_offsets``
    start at 0, do not decrease and end at ``total_delta`` (``L'``), ``num_targets >= 0``
    (shape ``[B]``); the rest (lengths vs the cache's ``max_seq_len``, targets inside the
    delta) is :func:`check_delta_step`'s, from the returned :class:`DeltaStepStats`.

    Args:
        cache_offsets: ``[B + 1]`` offsets of the cached tokens.
        delta_offsets: ``[B + 1]`` offsets of the delta tokens.
        total_delta: ``L'``.
        num_targets: optional ``[B]``.
        flags: 0-d device tensors (or None: not set) read in the same transfer, e.g. from
            :func:`prefix_offsets_flag` and :func:`batch_key_flag`.
    """
    batch_size = cache_offsets.numel() - 1
    if num_targets is not None and (num_targets.dim() != 1 or num_targets.numel() != batch_size):
        raise ValueError(f"num_targets must be [B]=[{batch_size}]; got {tuple(num_targets.shape)}")
    if is_tracing():
        return None
    prefix = (cache_offsets[1:] - cache_offsets[:-1]).to(torch.int64)
    deltas = (delta_offsets[1:] - delta_offsets[:-1]).to(torch.int64)
    targets = torch.zeros_like(deltas) if num_targets is None else num_targets.to(deltas.device, torch.int64)
    zero = deltas.new_zeros(1)

    def top(t: torch.Tensor) -> torch.Tensor:
        # max(t, 0): defined for an empty batch, and every check below compares with 0.
        return torch.cat([t, zero]).max()

    entries = [
        top(prefix + deltas),
        top(targets - deltas),
        top(deltas - targets),
        top(deltas),
        top(-targets),
        top(-deltas),
        delta_offsets[0].to(torch.int64),
        delta_offsets[-1].to(torch.int64),
    ]
    entries += [zero[0] if flag is None else flag.to(deltas.device, torch.int64) for flag in flags]
    host = torch.stack(entries).tolist()
    longest, targets_in_prefix, history_in_delta, longest_delta, negative_target, negative_delta, first, last = host[:8]
    if first != 0 or negative_delta > 0 or last != total_delta:
        raise ValueError(
            "delta_offsets must be non-decreasing, start at 0 and end at the number of delta tokens "
            f"L'={total_delta}; got {delta_offsets.tolist()[:16]}"
        )
    if negative_target > 0:
        assert num_targets is not None  # targets are zeros without num_targets
        raise ValueError(f"num_targets must be >= 0 for every sequence; got {num_targets.tolist()[:16]}")
    return DeltaStepStats(
        longest, targets_in_prefix, history_in_delta, longest_delta, tuple(bool(v) for v in host[8:])
    )


def check_delta_batch_sync(
    cache_offsets: torch.Tensor,
    prefix_offsets: torch.Tensor,
    what: str,
    delta_x: torch.Tensor,
    delta_offsets: Optional[torch.Tensor],
    num_targets: Optional[torch.Tensor],
    append: bool,
    cache_key: Optional[torch.Tensor] = None,
    batch_key: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[DeltaStepStats]]:
    """The edge check of a layer's or stack's delta step: same batch (``prefix_offsets``,
    ``batch_key``), valid delta offsets and targets, in one host read.

    Returns:
        ``(delta_offsets as int64 [B + 1], DeltaStepStats or None while tracing)``.
    """
    check_append_targets(num_targets, append)
    delta_offsets = resolve_delta_offsets(delta_x, delta_offsets, cache_offsets.numel() - 1)
    flags = [prefix_offsets_flag(cache_offsets, prefix_offsets, what), batch_key_flag(cache_key, batch_key)]
    stats = delta_step_stats_sync(cache_offsets, delta_offsets, delta_x.shape[0], num_targets, flags)
    check_prefix_offsets(stats, 0, cache_offsets, prefix_offsets, what)
    check_batch_key(stats, 1)
    return delta_offsets, stats


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
        stats: from :func:`delta_step_stats_sync` (None while tracing: value checks skipped).
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


def check_prefill(options: AttentionOptions, facts: Optional[JaggedBatchFacts]) -> None:
    """Refuse prefills the cached path cannot continue exactly (``facts``: the prefixes' host
    facts from the edge check; None while tracing)."""
    if not options.causal:
        raise ValueError("the KV-cached path needs causal attention (causal=True)")
    c = options.contextual_seq_len
    if c > 0 and not options.use_sla and facts is not None and facts.batch_size > 0:
        shortest = min(facts.lengths)
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


def prefill_transducer(transducer: nn.Module, history: JaggedInput, max_seq_len: int, **kwargs: Any) -> HSTUKVCache:
    """Same as ``transducer.prefill(history, max_seq_len, **kwargs)``
    (:meth:`~torchrec_hstu.modules.HSTUTransducer.prefill`); kept for existing callers."""
    # An HSTUTransducer (not imported here: hstu_transducer imports this module).
    return cast(Any, transducer).prefill(history, max_seq_len, **kwargs)


def score_candidates(
    transducer: nn.Module, candidates: JaggedInput, cache: HSTUKVCache, history_offsets: torch.Tensor, **kwargs: Any
) -> JaggedTensor:
    """Same as ``transducer.score_candidates(candidates, cache, history_offsets, **kwargs)``
    (:meth:`~torchrec_hstu.modules.HSTUTransducer.score_candidates`); kept for existing callers."""
    return cast(Any, transducer).score_candidates(candidates, cache, history_offsets, **kwargs)
