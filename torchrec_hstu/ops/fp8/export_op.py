"""``torchrec_hstu::hstu_fp8_fwd``: the whole FP8 attention forward (quantize + kernel) as one
opaque custom op, for ``torch.export`` / AOTInductor (notes decision 8).

The quantizers read per-sequence lengths and build descale tensors whose sizes depend on the
data; traced op by op they would raise data-dependent guard errors or leave unbacked sizes in
the graph. Inside one custom op with a fake impl (``v.new_empty([L, H, Dv])``) the exported
graph holds a single node per attention call.

:func:`torchrec_hstu.ops.fp8.dispatch.fp8_hstu_attention` calls it only under
``torch.compiler.is_exporting()``; eager training and evaluation never do (autograd stays on
the direct path). The op has no autograd formula: it is for inference graphs.

The op carries the kernel the model was exported with (``kernel``: the resolved
:class:`~torchrec_hstu.ops.common.HSTUKernel` name). Implementations (notes decisions 4 and 8):
on CPU (and any non-CUDA device) every kernel's FP8 definition is computed by the exact
emulation, so a model exported for a GPU kernel still runs on a CPU; on CUDA the op runs exactly
the recorded kernel through :func:`~torchrec_hstu.ops.fp8.dispatch.run_fp8_kernel`, the eager
half of the dispatcher (PYTORCH -> the emulation, TRITON -> the Triton FP8 kernel, CUTLASS ->
the wheel) and, where that kernel cannot run (no Triton, no wheel, a GPU below its FP8 gate),
raises the dispatcher's error naming kernel and mode instead of falling back to another kernel.
The choice is logged once per device.
"""

import logging
from typing import Optional, Set, Union

import torch

from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel, to_kernel

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
    kernel: str,
) -> torch.Tensor:
    """FP8 HSTU attention forward (CPU / default impl: the exact emulation, for every kernel).

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
        kernel: ``"PYTORCH"``, ``"TRITON"`` or ``"CUTLASS"``: the kernel the model was exported
            with; the CUDA implementation runs exactly it.

    Returns:
        ``[L, H, Dv]`` in the dtype of ``q``.
    """
    from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated

    to_kernel(kernel)  # a malformed graph fails here, not silently
    options = _options(
        scaling_seqlen, fp8_quant_mode, causal, max_attn_len, contextual_seq_len,
        min_full_attn_seq_len, sla_k1, sla_k2,
    )
    _log_choice(q.device, f"the PyTorch emulation (exported kernel {kernel})")
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
    kernel: str,
) -> torch.Tensor:
    """CUDA implementation: exactly the exported ``kernel``, or the error saying why it cannot run."""
    from torchrec_hstu.ops.fp8.dispatch import run_fp8_kernel

    options = _options(
        scaling_seqlen, fp8_quant_mode, causal, max_attn_len, contextual_seq_len,
        min_full_attn_seq_len, sla_k1, sla_k2,
    )
    with torch.no_grad():
        out = run_fp8_kernel(to_kernel(kernel), q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
    _log_choice(q.device, f"the {kernel} kernel")
    return out


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
    kernel: str,
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
    kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
) -> torch.Tensor:
    """The op with :class:`AttentionOptions` unpacked (same arguments as the other kernels).

    ``kernel`` is stored in the graph by name; the dispatcher passes the kernel it resolved.
    """
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
        to_kernel(kernel).name,
    )
