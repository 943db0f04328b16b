"""Delta (KV-cached, incremental) HSTU attention: checks and dispatch on :class:`HSTUKernel`.

Symbols: ``B`` batch, ``L`` total key tokens, ``L'`` total delta tokens, ``H`` heads,
``Dqk``/``Dv`` head dims. Sequence ``b`` has ``n_b`` keys/values (``seq_offsets``: the cached
prefix followed by the new tokens); its last ``d_b`` tokens are the queries ``delta_q``
(``delta_offsets``, or ``d`` for every sequence when omitted, as in generative-recommenders).
The result is exactly rows ``n_b - d_b .. n_b - 1`` of the full attention
:func:`~torchrec_hstu.ops.hstu_attention.hstu_attention` with the same options, computed
without the ``n_b - d_b`` prefix queries: ``O(d_b * n_b)`` work instead of ``O(n_b^2)``.

Kernels (the backend table, :mod:`torchrec_hstu.ops.backends`, says which can): ``PYTORCH``
(reference; FP8 via the emulation with the "delta-q" rule, see
:mod:`torchrec_hstu.ops.pytorch.delta_attention`), ``TRITON`` (CUDA, bf16/fp16/fp32 and FP8,
:mod:`torchrec_hstu.ops.triton.delta_attention`), ``CUTLASS`` with FBGEMM's wheel
(``is_delta_q``, bf16/fp16). The delta path is for inference: only the PYTORCH high-precision
path has autograd.
"""

import logging
from typing import Optional, Union

import torch

from torchrec_hstu.ops.backends import AttentionRequest, run_delta_attention, select_backend
from torchrec_hstu.ops.common import (
    _FLOAT_DTYPES,
    AttentionOptions,
    HSTUKernel,
    check_num_targets,
    check_seq_offsets,
    is_tracing,
    to_kernel,
)

logger = logging.getLogger(__name__)


def uniform_delta_offsets(batch_size: int, total_delta: int, device: torch.device) -> torch.Tensor:
    """``[B + 1]`` offsets of ``d = L' / B`` delta rows per sequence (``ValueError`` if not whole)."""
    if batch_size == 0:
        if total_delta != 0:
            raise ValueError(f"delta_q has {total_delta} rows for an empty batch (B = 0)")
        return torch.zeros(1, dtype=torch.int64, device=device)
    if total_delta % batch_size != 0:
        raise ValueError(
            f"delta_q must hold the same number of rows per sequence (L' = B * d) when "
            f"delta_offsets is not given; got L'={total_delta} rows for B={batch_size} sequences. "
            "Pass delta_offsets [B + 1] for different delta lengths."
        )
    delta = total_delta // batch_size
    return torch.arange(batch_size + 1, dtype=torch.int64, device=device) * delta


def check_delta_attention_inputs(
    delta_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    delta_offsets: torch.Tensor,
    max_seq_len: int,
    num_targets: Optional[torch.Tensor],
    check_values: bool = True,
) -> None:
    """Raise ``ValueError`` naming the argument and the expected form.

    Shapes, dtypes and devices always (free); with ``check_values`` (and not tracing) the values
    too (offsets, ``d_b <= n_b``, lengths vs ``max_seq_len``, ``num_targets`` range), with one
    host sync.
    """
    if not isinstance(max_seq_len, (int, torch.SymInt)) or (isinstance(max_seq_len, int) and max_seq_len <= 0):
        raise ValueError(f"max_seq_len must be a positive int; got {max_seq_len!r}")
    if delta_q.dim() != 3:
        raise ValueError(f"delta_q must be 3-D [L', H, Dqk]; got shape {tuple(delta_q.shape)}")
    _, num_heads, dim_qk = delta_q.shape
    if k.dim() != 3 or k.shape[1] != num_heads or k.shape[2] != dim_qk:
        raise ValueError(
            f"k must be 3-D [L, H, Dqk] with H={num_heads} and Dqk={dim_qk} like delta_q; got {tuple(k.shape)}"
        )
    if v.dim() != 3 or v.shape[0] != k.shape[0] or v.shape[1] != num_heads:
        raise ValueError(
            f"v must be 3-D [L, H, Dv] with L={k.shape[0]} like k and H={num_heads}; got {tuple(v.shape)}"
        )
    if delta_q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"delta_q must be float16/bfloat16/float32/float64; got {delta_q.dtype}")
    if k.dtype != delta_q.dtype or v.dtype != delta_q.dtype:
        raise ValueError(f"delta_q, k, v must share a dtype; got {delta_q.dtype}, {k.dtype}, {v.dtype}")
    device = delta_q.device
    for name, t in (("k", k), ("v", v), ("seq_offsets", seq_offsets), ("delta_offsets", delta_offsets)):
        if t.device != device:
            raise ValueError(f"{name} must be on delta_q's device {device}; got {t.device}")
    check_seq_offsets(seq_offsets, k.shape[0], check_values=check_values)
    check_seq_offsets(delta_offsets, delta_q.shape[0], name="delta_offsets", check_values=check_values)
    batch_size = seq_offsets.numel() - 1
    if delta_offsets.numel() != batch_size + 1:
        raise ValueError(
            f"delta_offsets must have B + 1 = {batch_size + 1} entries like seq_offsets; got {delta_offsets.numel()}"
        )
    check_num_targets(num_targets, batch_size, device)
    if not check_values or is_tracing() or batch_size == 0:
        return
    lengths = (seq_offsets[1:] - seq_offsets[:-1]).to(torch.int64)
    deltas = (delta_offsets[1:] - delta_offsets[:-1]).to(torch.int64)
    stats = [lengths.max(), (deltas - lengths).max()]
    if num_targets is not None:
        targets = num_targets.to(torch.int64)
        stats += [targets.min(), (targets - lengths).max()]
    stats = torch.stack(stats).tolist()
    if isinstance(max_seq_len, int) and stats[0] > max_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} is smaller than the longest sequence ({stats[0]} tokens)")
    if stats[1] > 0:
        raise ValueError(
            "every sequence's delta length (delta_offsets) must be <= its full length (seq_offsets); got "
            f"deltas={deltas.tolist()[:16]} for lengths={lengths.tolist()[:16]}"
        )
    if num_targets is not None and (stats[2] < 0 or stats[3] > 0):
        raise ValueError(
            "num_targets must be in [0, sequence length] for every sequence; got "
            f"num_targets={num_targets.tolist()[:16]} for lengths={lengths.tolist()[:16]}"
        )


def delta_hstu_attention(
    delta_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions = AttentionOptions(),
    num_targets: Optional[torch.Tensor] = None,
    delta_offsets: Optional[torch.Tensor] = None,
    kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
    check_values: bool = True,
) -> torch.Tensor:
    """HSTU attention of the last ``d_b`` tokens of each sequence against all its keys.

    Args:
        delta_q: ``[L', H, Dqk]`` queries of the last ``d_b`` tokens of each sequence.
        k: ``[L, H, Dqk]`` keys of the full sequences (prefix + delta tokens).
        v: ``[L, H, Dv]`` values of the full sequences.
        seq_offsets: ``[B + 1]`` offsets of ``k``/``v``.
        max_seq_len: batch maximum of the full lengths (``scaling_seqlen=-1`` divides by it, as
            the full forward does).
        alpha: scale of ``q k^T``.
        options: mask and numerics options (every mask option; ``fp8_quant_mode`` 0..5).
        num_targets: optional ``[B]`` trailing targets of the full sequences.
        delta_offsets: optional ``[B + 1]`` offsets of ``delta_q``; default ``L' / B`` rows
            per sequence.
        kernel: ``PYTORCH``, ``TRITON`` (CUDA), ``CUTLASS`` (FBGEMM's wheel) or ``AUTO``.
        check_values: check the offsets' values (one host sync); False when the caller
            checked them at its edge.

    Returns:
        ``[L', H, Dv]`` in the dtype of ``delta_q``.

    Example::

        >>> k = v = torch.randn(7, 2, 8)
        >>> seq_offsets = torch.tensor([0, 3, 7])
        >>> delta_q = torch.randn(4, 2, 8)  # the last 2 tokens of each sequence
        >>> delta_hstu_attention(delta_q, k, v, seq_offsets, max_seq_len=4, alpha=0.35).shape
        torch.Size([4, 2, 8])
    """
    uniform_delta: Optional[int] = None
    if delta_offsets is None:
        if not isinstance(delta_q, torch.Tensor) or delta_q.dim() != 3:
            raise ValueError(f"delta_q must be 3-D [L', H, Dqk]; got {getattr(delta_q, 'shape', type(delta_q))}")
        batch_size = seq_offsets.numel() - 1
        delta_offsets = uniform_delta_offsets(batch_size, delta_q.shape[0], delta_q.device)
        uniform_delta = delta_q.shape[0] // batch_size if batch_size > 0 else 0
    check_delta_attention_inputs(
        delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, num_targets, check_values=check_values
    )
    request = AttentionRequest.for_call(delta_q, v, options, max_seq_len, num_targets, delta=True, k=k)
    backend = select_backend(kernel, request)
    return run_delta_attention(
        backend, delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, alpha, options, num_targets, uniform_delta
    )


def delta_hstu_mha(
    max_seq_len: int,
    alpha: float,
    delta_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor] = None,
    max_attn_len: int = 0,
    contextual_seq_len: int = 0,
    scaling_seqlen: int = -1,
    fp8_quant_mode: int = -1,
    kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
    *,
    causal: bool = True,
    min_full_attn_seq_len: int = 0,
    sla_k1: int = 0,
    sla_k2: int = 0,
    delta_offsets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """generative-recommenders compatible signature over :func:`delta_hstu_attention`.

    Args:
        max_seq_len: batch maximum of the full lengths ``N``.
        alpha: scale of ``q k^T``.
        delta_q: ``[L', H, Dqk]``, the last ``d_b`` tokens' queries (``d = L' / B`` for every
            sequence unless ``delta_offsets`` is given).
        k: ``[L, H, Dqk]`` full keys.
        v: ``[L, H, Dv]`` full values.
        seq_offsets: ``[B + 1]`` offsets of ``k``/``v``.
        num_targets: optional ``[B]``.
        max_attn_len: window (0: none).
        contextual_seq_len: contextual prefix length.
        scaling_seqlen: divisor; -1 means ``max_seq_len``.
        fp8_quant_mode: -1 off, 0..5 FP8 modes.
        kernel: :class:`HSTUKernel` or its name.
        causal: causal mask.
        min_full_attn_seq_len: tail of history exempt from the window.
        sla_k1: Semi-Local Attention local window.
        sla_k2: Semi-Local Attention global prefix.
        delta_offsets: optional ``[B + 1]`` offsets of ``delta_q``.

    Returns:
        ``[L', H, Dv]``.
    """
    options = AttentionOptions(
        causal=causal,
        max_attn_len=max_attn_len or 0,
        contextual_seq_len=contextual_seq_len,
        min_full_attn_seq_len=min_full_attn_seq_len,
        sla_k1=sla_k1,
        sla_k2=sla_k2,
        scaling_seqlen=scaling_seqlen,
        fp8_quant_mode=fp8_quant_mode,
    )
    return delta_hstu_attention(
        delta_q,
        k,
        v,
        seq_offsets,
        max_seq_len,
        alpha,
        options,
        num_targets=num_targets,
        delta_offsets=delta_offsets,
        kernel=to_kernel(kernel),
    )
