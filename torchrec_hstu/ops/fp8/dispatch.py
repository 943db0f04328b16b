"""FP8 HSTU attention dispatch: the kernel the caller asked for, or an error (never bf16/fp16).

Called by :func:`torchrec_hstu.ops.hstu_attention.hstu_attention` when
``options.fp8_quant_mode >= 0``. Order of checks: the mode (``ValueError``), the kernel's
implementation present in this build (``RuntimeError``), the arch gate
(:func:`~torchrec_hstu.ops.fp8.arch.check_fp8_support`). Under ``torch.export`` the whole
forward becomes the opaque ``torchrec_hstu::hstu_fp8_fwd`` op (:mod:`.export_op`) and the
device part of the gate is skipped.
"""

import importlib
from typing import Callable, Optional, Union

import torch

from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel, to_kernel
from torchrec_hstu.ops.fp8.arch import check_fp8_quant_mode, check_fp8_support, refuse_backward

#: Module the Triton FP8 kernel lives in (written by the Triton work; absent until then).
TRITON_FP8_MODULE = "torchrec_hstu.ops.triton.fp8_attention"


def load_triton_fp8_attention() -> Callable[..., torch.Tensor]:
    """``triton_fp8_hstu_attention`` imported lazily; ``RuntimeError`` when this build lacks it."""
    try:
        module = importlib.import_module(TRITON_FP8_MODULE)
    except ModuleNotFoundError as err:
        if err.name is not None and (
            TRITON_FP8_MODULE.startswith(err.name) or err.name.split(".")[0] == "triton"
        ):
            raise RuntimeError(
                f"TRITON FP8 not available in this build ({err.name} cannot be imported); use "
                "kernel=CUTLASS (SM90) or kernel=PYTORCH (emulation) for fp8_quant_mode >= 0"
            ) from err
        raise
    fn = getattr(module, "triton_fp8_hstu_attention", None)
    if fn is None:
        raise RuntimeError(f"TRITON FP8 not available in this build ({TRITON_FP8_MODULE} has no triton_fp8_hstu_attention)")
    return fn


def fp8_hstu_attention(
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
    """FP8 HSTU attention with ``options.fp8_quant_mode`` in 0..5 on ``kernel``.

    Args:
        q: ``[L, H, Dqk]``.
        k: ``[L, H, Dqk]``.
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]``.
        max_seq_len: batch maximum length.
        alpha: scale of ``q k^T``.
        options: mask options and ``fp8_quant_mode``.
        num_targets: optional ``[B]``.
        kernel: PYTORCH (exact emulation, any device), TRITON (SM89+), CUTLASS (SM90; SM120
            mode 2 forward only); AUTO is resolved per device.

    Returns:
        ``[L, H, Dv]`` in the dtype of ``q``.

    Example::

        >>> q = k = v = torch.randn(5, 2, 8)
        >>> opts = AttentionOptions(fp8_quant_mode=2)
        >>> fp8_hstu_attention(q, k, v, torch.tensor([0, 3, 5]), 3, 0.35, opts).shape
        torch.Size([5, 2, 8])
    """
    from torchrec_hstu.ops.hstu_attention import resolve_kernel

    mode = options.fp8_quant_mode
    check_fp8_quant_mode(mode)
    kernel = resolve_kernel(to_kernel(kernel), q.device)
    if torch.compiler.is_exporting():
        check_fp8_support(kernel, mode, q.shape[2], v.shape[2], q.device)  # static checks only
        from torchrec_hstu.ops.fp8.export_op import call_hstu_fp8_fwd

        return call_hstu_fp8_fwd(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, kernel)
    return run_fp8_kernel(kernel, q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)


def run_fp8_kernel(
    kernel: HSTUKernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run FP8 attention on exactly ``kernel`` (resolved, not AUTO), checking its arch gate.

    The eager half of :func:`fp8_hstu_attention`, also the CUDA implementation of the export op
    (so it has no export branch). Raises where ``kernel`` cannot run this mode on this device.
    """
    mode = options.fp8_quant_mode
    if kernel == HSTUKernel.PYTORCH:
        check_fp8_support(kernel, mode, q.shape[2], v.shape[2], q.device)
        from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated

        return fp8_hstu_attention_emulated(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
    if kernel == HSTUKernel.TRITON:
        triton_fn = load_triton_fp8_attention()
        check_fp8_support(kernel, mode, q.shape[2], v.shape[2], q.device)
        return triton_fn(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
    if kernel == HSTUKernel.CUTLASS:
        from torchrec_hstu.ops.cutlass import cutlass_available, cutlass_hstu_attention

        if not cutlass_available():
            raise RuntimeError(
                f"kernel=CUTLASS with fp8_quant_mode={mode} needs the fbgemm_gpu_hstu wheel "
                "(`from hstu import hstu_attn_varlen_func`), which is not installed"
            )
        backward_supported = check_fp8_support(kernel, mode, q.shape[2], v.shape[2], q.device)
        out = cutlass_hstu_attention(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
        if not backward_supported:
            out = refuse_backward(
                out,
                f"kernel=CUTLASS FP8 (fp8_quant_mode={mode}) is forward-only on this device (SM120); "
                "train on SM90 or with fp8_quant_mode=-1",
            )
        return out
    raise ValueError(f"unsupported kernel {kernel!r}")
