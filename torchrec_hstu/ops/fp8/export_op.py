"""``torchrec_hstu::hstu_fp8_fwd``: the whole FP8 attention forward (quantize + kernel) as one
opaque custom op, for ``torch.export`` / AOTInductor (notes decision 8).

The quantizers read per-sequence lengths and build descale tensors whose sizes depend on the
data; traced op by op they would raise data-dependent guard errors or leave unbacked sizes in
the graph. Inside one custom op with a fake impl (``v.new_empty([L, H, Dv])``) the exported
graph holds a single node per attention call.

:func:`torchrec_hstu.ops.fp8.dispatch.fp8_hstu_attention` calls it only under
``torch.compiler.is_exporting()``; eager training and evaluation never do (autograd stays on
the direct path). The op has no autograd formula: it is for inference graphs.

Implementations, picked when the exported program runs (all compute the same FP8 definition,
none runs bf16/fp16): CPU (and any non-CUDA device) -> the exact emulation; CUDA -> the CUTLASS
wheel when it imports and the device passes its FP8 gate, else the Triton FP8 kernel when it
imports and the device passes its gate, else the emulation on CUDA. The choice is logged once.
"""

import logging
from typing import Optional, Set

import torch

from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel

logger = logging.getLogger(__name__)

OP_NAME = "torchrec_hstu::hstu_fp8_fwd"
_logged: Set[str] = set()


def _options(
    scaling_seqlen: int,
    fp8_quant_mode: int,
    causal: bool,
    max_attn_len: int,
    contextual_seq_len: int,
    min_full_attn_seq_len: int,
    sla_k1: int,
    sla_k2: int,
) -> AttentionOptions:
    return AttentionOptions(
        causal=causal,
        max_attn_len=max_attn_len,
        contextual_seq_len=contextual_seq_len,
        min_full_attn_seq_len=min_full_attn_seq_len,
        sla_k1=sla_k1,
        sla_k2=sla_k2,
        scaling_seqlen=scaling_seqlen,
        fp8_quant_mode=fp8_quant_mode,
    )


def _log_choice(device: torch.device, choice: str) -> None:
    key = f"{device.type}:{choice}"
    if key not in _logged:
        _logged.add(key)
        logger.info("%s runs FP8 attention on %s with %s", OP_NAME, device, choice)


@torch.library.custom_op(OP_NAME, mutates_args=())
def hstu_fp8_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    scaling_seqlen: int,
    alpha: float,
    fp8_quant_mode: int,
    causal: bool,
    max_attn_len: int,
    contextual_seq_len: int,
    min_full_attn_seq_len: int,
    sla_k1: int,
    sla_k2: int,
) -> torch.Tensor:
    """FP8 HSTU attention forward (CPU / default impl: the exact emulation).

    Args:
        q: ``[L, H, Dqk]``.
        k: ``[L, H, Dqk]``.
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]``.
        num_targets: optional ``[B]``.
        max_seq_len: batch maximum length.
        scaling_seqlen: divisor (-1: ``max_seq_len``).
        alpha: scale of ``q k^T``.
        fp8_quant_mode: 0..5.
        causal, max_attn_len, contextual_seq_len, min_full_attn_seq_len, sla_k1, sla_k2: the
            mask options of :class:`~torchrec_hstu.ops.common.AttentionOptions`.

    Returns:
        ``[L, H, Dv]`` in the dtype of ``q``.
    """
    from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated

    options = _options(
        scaling_seqlen, fp8_quant_mode, causal, max_attn_len, contextual_seq_len,
        min_full_attn_seq_len, sla_k1, sla_k2,
    )
    _log_choice(q.device, "the PyTorch emulation")
    with torch.no_grad():
        return fp8_hstu_attention_emulated(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)


@hstu_fp8_fwd.register_kernel("cuda")
def _hstu_fp8_fwd_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    scaling_seqlen: int,
    alpha: float,
    fp8_quant_mode: int,
    causal: bool,
    max_attn_len: int,
    contextual_seq_len: int,
    min_full_attn_seq_len: int,
    sla_k1: int,
    sla_k2: int,
) -> torch.Tensor:
    from torchrec_hstu.ops.cutlass import cutlass_available, cutlass_hstu_attention
    from torchrec_hstu.ops.fp8.arch import check_fp8_support
    from torchrec_hstu.ops.fp8.dispatch import load_triton_fp8_attention
    from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated

    options = _options(
        scaling_seqlen, fp8_quant_mode, causal, max_attn_len, contextual_seq_len,
        min_full_attn_seq_len, sla_k1, sla_k2,
    )
    args = (q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)

    def supported(kernel: HSTUKernel) -> bool:
        try:
            check_fp8_support(kernel, fp8_quant_mode, q.shape[2], v.shape[2], q.device)
        except (RuntimeError, ValueError):
            return False
        return True

    with torch.no_grad():
        if cutlass_available() and supported(HSTUKernel.CUTLASS):
            _log_choice(q.device, "the CUTLASS wheel")
            return cutlass_hstu_attention(*args)
        if supported(HSTUKernel.TRITON):
            try:
                triton_fn = load_triton_fp8_attention()
            except RuntimeError:
                triton_fn = None
            if triton_fn is not None:
                _log_choice(q.device, "the Triton FP8 kernel")
                return triton_fn(*args)
        _log_choice(q.device, "the PyTorch emulation")
        return fp8_hstu_attention_emulated(*args)


@hstu_fp8_fwd.register_fake
def _hstu_fp8_fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    scaling_seqlen: int,
    alpha: float,
    fp8_quant_mode: int,
    causal: bool,
    max_attn_len: int,
    contextual_seq_len: int,
    min_full_attn_seq_len: int,
    sla_k1: int,
    sla_k2: int,
) -> torch.Tensor:
    return v.new_empty((q.shape[0], q.shape[1], v.shape[2]))


def call_hstu_fp8_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The op with :class:`AttentionOptions` unpacked (same arguments as the other kernels)."""
    return torch.ops.torchrec_hstu.hstu_fp8_fwd(
        q,
        k,
        v,
        seq_offsets,
        num_targets,
        max_seq_len,
        options.scaling_seqlen,
        float(alpha),
        options.fp8_quant_mode,
        options.causal,
        options.max_attn_len,
        options.contextual_seq_len,
        options.min_full_attn_seq_len,
        options.sla_k1,
        options.sla_k2,
    )
