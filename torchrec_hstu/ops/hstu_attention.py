"""HSTU attention: one entry point that checks inputs and dispatches on :class:`HSTUKernel`.

Symbols: ``B`` batch size, ``L`` total tokens, ``H`` heads, ``Dqk`` q/k head dim, ``Dv`` v head
dim. Tensors are jagged: ``q: [L, H, Dqk]``, ``k: [L, H, Dqk]``, ``v: [L, H, Dv]`` with
``seq_offsets: [B + 1]``.
"""

import logging
from typing import Any, Dict, Optional, Union

import torch

from torchrec_hstu.ops.common import (
    AttentionOptions,
    HSTUKernel,
    check_attention_inputs,
    is_tracing,
    to_kernel,
)
from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention

logger = logging.getLogger(__name__)


def triton_available() -> bool:
    """Whether our Triton HSTU kernels can run here (CUDA + Triton importable)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchrec_hstu.ops.triton import hstu_attention as _  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernel(kernel: Union[HSTUKernel, str], device: torch.device) -> HSTUKernel:
    """Resolve ``AUTO`` to a concrete kernel for ``device``; other kernels are returned as is."""
    kernel = to_kernel(kernel)
    if kernel != HSTUKernel.AUTO:
        return kernel
    chosen = (
        HSTUKernel.TRITON
        if device.type == "cuda" and triton_available()
        else HSTUKernel.PYTORCH
    )
    logger.debug("HSTUKernel.AUTO resolved to %s for device %s", chosen.value, device)
    return chosen


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions = AttentionOptions(),
    num_targets: Optional[torch.Tensor] = None,
    dropout_pr: float = 0.0,
    training: bool = False,
    kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
    cache: Optional[Dict[str, Any]] = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Jagged HSTU attention ``(silu(alpha q k^T) / scaling_seqlen * mask) v``.

    Args:
        q: ``[L, H, Dqk]``.
        k: ``[L, H, Dqk]``.
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]`` int32/int64, non-decreasing, from 0 to ``L``.
        max_seq_len: batch maximum sequence length (default divisor, export padding bound).
        alpha: scale of ``q k^T`` (STULayer uses ``1/sqrt(Dqk)``).
        options: mask and numerics options (:class:`AttentionOptions`).
        num_targets: optional ``[B]`` number of trailing target tokens per sequence.
        dropout_pr: dropout on attention weights (PYTORCH kernel only).
        training: whether dropout is active.
        kernel: which implementation runs it; an explicit kernel is honoured or refused.
        cache: optional per-batch dict shared by layers with the same ``seq_offsets``.
        check_values: check offsets / lengths / ``num_targets`` values (one host sync). Modules
            check once per batch at their edge and pass False to every layer.

    Returns:
        ``[L, H, Dv]`` in the dtype of ``q``.

    Example::

        >>> q = k = v = torch.randn(5, 2, 8)
        >>> out = hstu_attention(q, k, v, torch.tensor([0, 3, 5]), max_seq_len=3, alpha=0.35)
        >>> out.shape
        torch.Size([5, 2, 8])
    """
    check_attention_inputs(
        q, k, v, seq_offsets, max_seq_len, num_targets, options, dropout_pr, check_values=check_values
    )
    kernel = resolve_kernel(kernel, q.device)
    if options.use_fp8:
        from torchrec_hstu.ops.fp8.dispatch import fp8_hstu_attention

        if dropout_pr > 0.0 and training:
            raise ValueError("dropout_pr > 0 is not supported with fp8_quant_mode >= 0")
        return fp8_hstu_attention(
            q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, kernel
        )
    if kernel == HSTUKernel.PYTORCH:
        return pytorch_hstu_attention(
            q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, dropout_pr, training, cache
        )
    if kernel == HSTUKernel.TRITON:
        if not is_tracing() and q.device.type != "cuda":
            raise ValueError(f"kernel=TRITON needs CUDA tensors; got q on {q.device}")
        if dropout_pr > 0.0 and training:
            raise ValueError("kernel=TRITON does not implement attention dropout; use PYTORCH")
        from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

        return triton_hstu_attention(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
    if kernel == HSTUKernel.CUTLASS:
        if dropout_pr > 0.0 and training:
            raise ValueError("kernel=CUTLASS does not implement attention dropout; use PYTORCH")
        from torchrec_hstu.ops.cutlass import cutlass_hstu_attention

        return cutlass_hstu_attention(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
    raise ValueError(f"unsupported kernel {kernel!r}")


def hstu_mha(
    max_seq_len: int,
    alpha: float,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    causal: bool = True,
    dropout_pr: float = 0.0,
    training: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    max_attn_len: int = 0,
    contextual_seq_len: int = 0,
    min_full_attn_seq_len: int = 0,
    scaling_seqlen: int = -1,
    sla_k1: int = 0,
    sla_k2: int = 0,
    fp8_quant_mode: int = -1,
    kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
) -> torch.Tensor:
    """generative-recommenders compatible signature over :func:`hstu_attention`.

    Args:
        max_seq_len: batch maximum sequence length ``N``.
        alpha: scale of ``q k^T``.
        q: ``[L, H, Dqk]``.
        k: ``[L, H, Dqk]``.
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]``.
        causal: causal mask.
        dropout_pr: dropout on the attention weights (PYTORCH only).
        training: dropout active.
        num_targets: optional ``[B]``.
        max_attn_len: window (0: none).
        contextual_seq_len: contextual prefix length.
        min_full_attn_seq_len: tail of history exempt from the window.
        scaling_seqlen: divisor; -1 means ``max_seq_len``.
        sla_k1: Semi-Local Attention local window.
        sla_k2: Semi-Local Attention global prefix.
        fp8_quant_mode: -1 off, 0..5 FP8 modes.
        kernel: :class:`HSTUKernel` or its name.

    Returns:
        ``[L, H, Dv]``.
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
    return hstu_attention(
        q,
        k,
        v,
        seq_offsets,
        max_seq_len,
        alpha,
        options,
        num_targets=num_targets,
        dropout_pr=dropout_pr,
        training=training,
        kernel=kernel,
    )
