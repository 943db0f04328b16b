"""Shared pieces of the ops layer: the kernel enum, the attention options and input checks."""

import dataclasses
import functools
import logging
import weakref
from enum import Enum, unique
from typing import Any, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

#: FP8 quantization modes (notes decision 5): -1 off, 0 plain cast, 1 two-direction,
#: 2 per-block, 3 per-(sample, head), 4 per-sample, 5 per-tensor.
MIN_FP8_QUANT_MODE = -1
MAX_FP8_QUANT_MODE = 5


@unique
class HSTUKernel(str, Enum):
    """Which implementation runs HSTU attention.

    ``PYTORCH`` is the reference (any device, also the exact FP8 emulation), ``TRITON`` runs
    our Triton kernels on CUDA, ``CUTLASS`` calls the optional ``fbgemm_gpu_hstu`` wheel.
    ``AUTO`` picks ``TRITON`` for CUDA tensors when Triton kernels are available and
    ``PYTORCH`` otherwise, and logs the choice. An explicit choice is never swapped.
    """

    PYTORCH = "PYTORCH"
    TRITON = "TRITON"
    CUTLASS = "CUTLASS"
    AUTO = "AUTO"


def to_kernel(kernel) -> HSTUKernel:
    """Accept an :class:`HSTUKernel` or its (case-insensitive) name."""
    if isinstance(kernel, HSTUKernel):
        return kernel
    if isinstance(kernel, str):
        try:
            return HSTUKernel(kernel.upper())
        except ValueError:
            pass
    raise ValueError(
        f"kernel must be one of {[k.value for k in HSTUKernel]} (or an HSTUKernel); got {kernel!r}"
    )


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Mask and numerics options of one HSTU attention call.

    Travels unchanged from :class:`~torchrec_hstu.modules.STULayer` down to the kernel.

    Attributes:
        causal: causal mask (a query sees earlier ids and itself).
        max_attn_len: attention window in ids (0: none).
        contextual_seq_len: length of the contextual prefix of every sequence.
        min_full_attn_seq_len: the last this-many history ids are exempt from the window.
        sla_k1: Semi-Local Attention local window (0: off).
        sla_k2: Semi-Local Attention global prefix (0: off). SLA is on if either is > 0.
        scaling_seqlen: divisor of ``silu(alpha * q k^T)``; -1 means the batch ``max_seq_len``.
        fp8_quant_mode: -1 (off) or an FP8 mode in 0..5.
    """

    causal: bool = True
    max_attn_len: int = 0
    contextual_seq_len: int = 0
    min_full_attn_seq_len: int = 0
    sla_k1: int = 0
    sla_k2: int = 0
    scaling_seqlen: int = -1
    fp8_quant_mode: int = -1

    def __post_init__(self) -> None:
        for name in (
            "max_attn_len",
            "contextual_seq_len",
            "min_full_attn_seq_len",
            "sla_k1",
            "sla_k2",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int; got {value!r}")
        if not isinstance(self.scaling_seqlen, int) or (
            self.scaling_seqlen != -1 and self.scaling_seqlen <= 0
        ):
            raise ValueError(
                f"scaling_seqlen must be -1 (batch max_seq_len) or a positive int; "
                f"got {self.scaling_seqlen!r}"
            )
        if not isinstance(self.fp8_quant_mode, int) or not (
            MIN_FP8_QUANT_MODE <= self.fp8_quant_mode <= MAX_FP8_QUANT_MODE
        ):
            raise ValueError(
                f"fp8_quant_mode must be an int in [{MIN_FP8_QUANT_MODE}, {MAX_FP8_QUANT_MODE}] "
                f"(-1 off, 0 cast, 1 two-direction, 2 per-block, 3 per-head, 4 per-batch, "
                f"5 per-tensor); got {self.fp8_quant_mode!r}"
            )
        if self.use_sla:
            if not self.causal:
                raise ValueError("Semi-Local Attention (sla_k1/sla_k2) requires causal=True")
            if self.max_attn_len > 0 or self.min_full_attn_seq_len > 0:
                raise ValueError(
                    "Semi-Local Attention (sla_k1/sla_k2) replaces the window: "
                    "max_attn_len and min_full_attn_seq_len must be 0 when SLA is on; got "
                    f"max_attn_len={self.max_attn_len}, "
                    f"min_full_attn_seq_len={self.min_full_attn_seq_len}"
                )

    @property
    def use_sla(self) -> bool:
        return self.sla_k1 > 0 or self.sla_k2 > 0

    @property
    def use_fp8(self) -> bool:
        return self.fp8_quant_mode >= 0

    def mask_signature(self, has_targets: bool) -> tuple:
        """What the mask depends on besides lengths (key for mask caches)."""
        return (
            self.causal,
            self.max_attn_len,
            self.contextual_seq_len,
            self.min_full_attn_seq_len,
            self.sla_k1,
            self.sla_k2,
            has_targets,
        )

    def resolve_scaling_seqlen(self, max_seq_len: int) -> int:
        return max_seq_len if self.scaling_seqlen < 0 else self.scaling_seqlen

    def to_op_args(self) -> Tuple[Any, ...]:
        """The fields in declaration order: how custom ops receive the options."""
        return tuple(getattr(self, name) for name in _OPTION_FIELDS)

    @classmethod
    def from_op_args(cls, args: Sequence[Any]) -> "AttentionOptions":
        """Inverse of :meth:`to_op_args` (validates like the constructor; cached, since a model
        has a handful of distinct options and every op call decodes them)."""
        return _options_from_op_args(tuple(args))


_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionOptions))


@functools.lru_cache(maxsize=256)
def _options_from_op_args(args: Tuple[Any, ...]) -> AttentionOptions:
    return AttentionOptions(*args)


def is_tracing() -> bool:
    """True under torch.compile / torch.export / fx symbolic tracing.

    Data-dependent checks and host syncs are skipped then (the anchors do the same).
    """
    import torch.fx._symbolic_trace as fx_trace

    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or fx_trace.is_fx_symbolic_tracing()
    )


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_seq_offsets(
    seq_offsets: torch.Tensor, total_len: int, name: str = "seq_offsets", check_values: bool = True
) -> None:
    """Static checks always; with ``check_values`` (and not tracing) the values too (start 0,
    non-decreasing, last == L), which reads the device once (one host sync).
    """
    if not isinstance(seq_offsets, torch.Tensor) or seq_offsets.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-D int32/int64 tensor of shape [B + 1]; got "
            f"{getattr(seq_offsets, 'shape', type(seq_offsets))}"
        )
    if seq_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64; got {seq_offsets.dtype}")
    if seq_offsets.numel() < 1:
        raise ValueError(f"{name} must have B + 1 >= 1 entries; got an empty tensor")
    if not check_values or is_tracing():
        return
    first, decreasing, last = torch.stack(
        [seq_offsets[0], (seq_offsets[1:] < seq_offsets[:-1]).any().to(seq_offsets.dtype), seq_offsets[-1]]
    ).tolist()
    if first != 0 or decreasing or last != total_len:
        raise ValueError(
            f"{name} must be non-decreasing, start at 0 and end at the number of tokens "
            f"L={total_len}; got {seq_offsets.tolist() if seq_offsets.numel() <= 16 else seq_offsets}"
        )


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    num_targets: Optional[torch.Tensor],
    options: AttentionOptions,
    dropout_pr: float = 0.0,
    check_values: bool = True,
) -> None:
    """Raise ``ValueError`` naming the argument and the expected form for bad inputs.

    Shapes, dtypes and devices are always checked (free). With ``check_values`` (and not
    tracing) the values are checked too (offsets, lengths vs ``max_seq_len``, ``num_targets``
    range) through :func:`check_jagged_batch_sync`: one host sync, skipped when the very same
    unchanged tensors passed last time (:func:`_values_checked_before`: per-layer calls of one
    batch read it once). Modules check values once per batch at their edge and pass
    ``check_values=False`` to every layer.
    """
    if not isinstance(max_seq_len, (int, torch.SymInt)) or (
        isinstance(max_seq_len, int) and max_seq_len <= 0
    ):
        raise ValueError(f"max_seq_len must be a positive int; got {max_seq_len!r}")
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [L, H, Dqk]; got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} [L, H, Dqk]; got {tuple(k.shape)}")
    if v.dim() != 3 or v.shape[0] != q.shape[0] or v.shape[1] != q.shape[1]:
        raise ValueError(
            f"v must be 3-D [L, H, Dv] with L={q.shape[0]} and H={q.shape[1]} like q; "
            f"got {tuple(v.shape)}"
        )
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float16/bfloat16/float32/float64; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device or seq_offsets.device != q.device:
        raise ValueError(
            f"q, k, v and seq_offsets must be on one device; got {q.device}, {k.device}, "
            f"{v.device}, {seq_offsets.device}"
        )
    if not 0.0 <= dropout_pr < 1.0:
        raise ValueError(f"dropout_pr must be in [0, 1); got {dropout_pr}")
    check_seq_offsets(seq_offsets, q.shape[0], check_values=False)
    check_num_targets(num_targets, seq_offsets.numel() - 1, q.device)
    if check_values and not _values_checked_before(seq_offsets, q.shape[0], max_seq_len, num_targets):
        facts = check_jagged_batch_sync(seq_offsets, q.shape[0], max_seq_len, num_targets)
        if facts is not None:
            _remember_checked(seq_offsets, q.shape[0], max_seq_len, num_targets)


#: The last batch whose values passed the public entry's check: weak references to its tensors
#: and its key (see :func:`_values_checked_before`).
_last_checked: Optional[Tuple[Tuple[Any, ...], Tuple[Any, ...]]] = None


def _batch_key(seq_offsets: torch.Tensor, total_len: int, max_seq_len: Any,
               num_targets: Optional[torch.Tensor]) -> Optional[Tuple[Any, ...]]:
    tensors = (seq_offsets,) if num_targets is None else (seq_offsets, num_targets)
    if not isinstance(max_seq_len, int) or any(t.is_inference() for t in tensors):
        return None  # inference tensors have no version counter
    return (total_len, max_seq_len, tuple((id(t), t._version) for t in tensors))


def _values_checked_before(seq_offsets: torch.Tensor, total_len: int, max_seq_len: Any,
                           num_targets: Optional[torch.Tensor]) -> bool:
    """Whether these very tensors, unchanged, passed the value check last time.

    generative-recommenders' models call ``hstu_mha`` once per layer with the same
    ``seq_offsets`` / ``num_targets``: their values are read once per batch, not per layer. The
    batch is recognised by its tensors themselves (while the weak references are alive no other
    tensor has their ids) and their version counters (an in-place write through any view bumps
    them), with the sizes the check depends on.
    """
    if _last_checked is None:
        return False
    refs, key = _last_checked
    return all(ref() is not None for ref in refs) and key == _batch_key(
        seq_offsets, total_len, max_seq_len, num_targets
    )


def _remember_checked(seq_offsets: torch.Tensor, total_len: int, max_seq_len: Any,
                      num_targets: Optional[torch.Tensor]) -> None:
    global _last_checked
    key = _batch_key(seq_offsets, total_len, max_seq_len, num_targets)
    tensors = (seq_offsets,) if num_targets is None else (seq_offsets, num_targets)
    _last_checked = None if key is None else (tuple(weakref.ref(t) for t in tensors), key)


#: Which chunks of the ``[u | v | q | k]`` projection go through SiLU: ``"u"`` (u only: GR's
#: production STU, the default) or ``"all"`` (u, v, q and k: GR's research HSTU, the paper's phi_1).
UVQK_ACTIVATIONS = ("u", "all")


def check_uvqk_activation(uvqk_activation: str) -> None:
    """``ValueError`` unless ``uvqk_activation`` is one of :data:`UVQK_ACTIVATIONS`."""
    if uvqk_activation not in UVQK_ACTIVATIONS:
        raise ValueError(
            "uvqk_activation must be 'u' (silu on u only) or 'all' (silu on u, v, q and k); "
            f"got {uvqk_activation!r}"
        )


def check_stu_dims(
    embedding_dim: int,
    num_heads: int,
    hidden_dim: int,
    attention_dim: int,
    output_dropout_ratio: float,
    contextual_seq_len: int,
    attn_alpha: Optional[float],
    uvqk_activation: str = "u",
) -> None:
    """The structural rules of one STU layer, beside the attention rules of
    :class:`AttentionOptions`: the one place both ``STULayerConfig`` and config validation ask
    (validation re-raises the ``ValueError``, whose text starts with the field name, with the
    field's path).

    Raises:
        ValueError: ``"<field> must be ...; got <value>"``.
    """
    for name, value in (("embedding_dim", embedding_dim), ("num_heads", num_heads),
                        ("hidden_dim", hidden_dim), ("attention_dim", attention_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if not 0.0 <= output_dropout_ratio < 1.0:
        raise ValueError(f"output_dropout_ratio must be in [0, 1); got {output_dropout_ratio!r}")
    if contextual_seq_len < -1:
        raise ValueError(
            f"contextual_seq_len must be >= 0 or -1 (the transducer's prefix); got {contextual_seq_len!r}"
        )
    if attn_alpha is not None and attn_alpha < 0:
        raise ValueError(f"attn_alpha must be >= 0 (0: 1/sqrt(attention_dim)); got {attn_alpha!r}")
    check_uvqk_activation(uvqk_activation)


def check_num_targets(num_targets: Optional[torch.Tensor], batch_size: int, device: torch.device) -> None:
    """Shape, dtype and device of ``num_targets: [B]`` (free; values are checked at the edge)."""
    if num_targets is None:
        return
    if not isinstance(num_targets, torch.Tensor) or num_targets.dim() != 1 or num_targets.numel() != batch_size:
        raise ValueError(
            f"num_targets must be 1-D of shape [B]=[{batch_size}]; got "
            f"{tuple(getattr(num_targets, 'shape', ()))}"
        )
    if num_targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"num_targets must be int32 or int64; got {num_targets.dtype}")
    if num_targets.device != device:
        raise ValueError(f"num_targets must be on {device} like the values; got {num_targets.device}")


@dataclasses.dataclass(frozen=True)
class JaggedBatchFacts:
    """Host-side facts of one jagged batch, read once at the model's edge.

    They travel down as plain ints (as generative-recommenders passes ``max_uih_len`` and
    ``total_targets``), so no layer reads the device again.

    Attributes:
        lengths: per-sequence lengths ``[B]``.
        num_targets: per-sequence trailing targets ``[B]``, or None.
        max_seq_len: the padding bound ``N``: the caller's ``max_seq_len`` when given, else the
            longest length (at least 1).
    """

    lengths: Tuple[int, ...]
    num_targets: Optional[Tuple[int, ...]]
    max_seq_len: int

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def total_len(self) -> int:
        return sum(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths, default=0)

    @property
    def total_targets(self) -> int:
        return sum(self.num_targets) if self.num_targets is not None else 0


def check_jagged_batch_sync(
    seq_offsets: torch.Tensor,
    total_len: int,
    max_seq_len: Optional[int] = None,
    num_targets: Optional[torch.Tensor] = None,
    name: str = "seq_offsets",
) -> Optional[JaggedBatchFacts]:
    """The edge check of a jagged batch: one host read, then :class:`JaggedBatchFacts`.

    Checks that ``seq_offsets`` start at 0, do not decrease and end at ``total_len``, that no
    sequence is longer than ``max_seq_len`` (when given) and that ``num_targets`` lies in
    ``[0, length]``. Under tracing nothing is read and None is returned.

    Args:
        seq_offsets: ``[B + 1]`` int32/int64.
        total_len: ``L``, the number of tokens.
        max_seq_len: the caller's padding bound, or None to take the longest length.
        num_targets: optional ``[B]``.
        name: the offsets' name in errors.

    Returns:
        :class:`JaggedBatchFacts`, or None while tracing.

    Example::

        >>> facts = check_jagged_batch_sync(torch.tensor([0, 3, 5]), 5, num_targets=torch.tensor([1, 0]))
        >>> facts.lengths, facts.max_seq_len, facts.total_targets
        ((3, 2), 3, 1)
    """
    check_seq_offsets(seq_offsets, total_len, name=name, check_values=False)
    batch_size = seq_offsets.numel() - 1
    check_num_targets(num_targets, batch_size, seq_offsets.device)
    if max_seq_len is not None and not isinstance(max_seq_len, torch.SymInt) and (
        not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len <= 0
    ):
        raise ValueError(f"max_seq_len must be a positive int; got {max_seq_len!r}")
    if is_tracing():
        return None
    # One transfer: offsets and targets side by side.
    parts = [seq_offsets.to(torch.int64)]
    if num_targets is not None:
        parts.append(num_targets.to(device=seq_offsets.device, dtype=torch.int64))
    host = torch.cat(parts).tolist()
    offsets, targets = host[: batch_size + 1], host[batch_size + 1 :]
    lengths = tuple(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    if offsets[0] != 0 or any(n < 0 for n in lengths) or offsets[-1] != total_len:
        raise ValueError(
            f"{name} must be non-decreasing, start at 0 and end at the number of tokens "
            f"L={total_len}; got {offsets if len(offsets) <= 16 else str(offsets[:16]) + ' ...'}"
        )
    longest = max(lengths, default=0)
    if isinstance(max_seq_len, int) and longest > max_seq_len:
        raise ValueError(
            f"max_seq_len={max_seq_len} is smaller than the longest sequence ({longest} tokens)"
        )
    facts_targets: Optional[Tuple[int, ...]] = None
    if num_targets is not None:
        facts_targets = tuple(targets)
        if any(t < 0 or t > n for t, n in zip(facts_targets, lengths)):
            raise ValueError(
                "num_targets must be in [0, sequence length] for every sequence; got "
                f"num_targets={list(facts_targets[:16])} for lengths={list(lengths[:16])}"
            )
    bound = max_seq_len if isinstance(max_seq_len, int) else max(longest, 1)
    return JaggedBatchFacts(lengths=lengths, num_targets=facts_targets, max_seq_len=bound)
