"""HSTU attention: one entry point that checks inputs and dispatches on :class:`HSTUKernel`.

Symbols: ``B`` batch size, ``L`` total tokens, ``H`` heads, ``Dqk`` q/k head dim, ``Dv`` v head
dim. Tensors are jagged: ``q: [L, H, Dqk]``, ``k: [L, H, Dqk]``, ``v: [L, H, Dv]`` with
``seq_offsets: [B + 1]``.
"""

import logging
from typing import Any, Dict, Optional, Union

import torch

from torchrec_hstu.ops.backends import (
    AttentionRequest,
    Backend,
    installed_backend,
    run_attention,
    select_backend,
    select_kernel_for_export,
)
from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel, check_attention_inputs, to_kernel
from torchrec_hstu.ops.fp8.export_op import call_hstu_fp8_fwd

logger = logging.getLogger(__name__)


def triton_available() -> bool:
    """Whether our Triton HSTU kernels can run here (CUDA + Triton importable)."""
    return torch.cuda.is_available() and installed_backend(HSTUKernel.TRITON) is not None


def resolve_kernel(
    kernel: Union[HSTUKernel, str], device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> HSTUKernel:
    """The kernel ``AUTO`` picks for a plain (causal, high-precision) call on ``device``;
    an explicit kernel is returned as it is (:func:`~torchrec_hstu.ops.backends.select_backend`
    decides per call, with the call's options)."""
    kernel = to_kernel(kernel)
    if kernel != HSTUKernel.AUTO:
        return kernel
    request = AttentionRequest(dtype=dtype, device_type=device.type, head_dim_qk=64, head_dim_v=64,
                               options=AttentionOptions())
    return select_backend(kernel, request).kernel


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
    dropout = dropout_pr > 0.0 and training
    request = AttentionRequest.for_call(q, v, options, max_seq_len, num_targets, dropout=dropout, k=k)
    if options.use_fp8 and torch.compiler.is_exporting():
        # The whole FP8 forward is one opaque op in the exported graph (notes decision 8); it
        # records the kernel so the package runs exactly that one.
        recorded = select_kernel_for_export(kernel, request)
        return call_hstu_fp8_fwd(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, recorded)
    backend: Backend = select_backend(kernel, request)
    return run_attention(
        backend, q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, dropout_pr, training, cache
    )


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
