"""Which kernel may run FP8 attention on which device (notes decision 7); fail loud otherwise.

* ``CUTLASS``: SM90 (Hopper) all modes, forward and backward; SM120 (Blackwell RTX) mode 2,
  forward only; SM80 / SM89 / SM100 and everything else refused. Head dims 64, 128, 256 and
  ``attention_dim == hidden_dim``.
* ``TRITON``: SM89 and newer (FP8 tensor cores), CUDA tensors.
* ``PYTORCH``: the exact emulation, any device.

Static checks (mode range, head dims) always run. Device checks are skipped while tracing or
exporting (:func:`~torchrec_hstu.ops.common.is_tracing`), so a model exports on a machine that
could not run it. No path ever falls back to bf16/fp16 or to another kernel.
"""

from typing import Tuple, cast

import torch

from torchrec_hstu.ops.common import (
    MAX_FP8_QUANT_MODE,
    HSTUKernel,
    is_tracing,
    to_kernel,
)

#: Head dims of the CUTLASS FP8 kernel.
CUTLASS_FP8_HEAD_DIMS = (64, 128, 256)
#: Oldest compute capability with FP8 tensor cores (Ada).
TRITON_FP8_MIN_CAPABILITY = (8, 9)
#: SM120 (Blackwell RTX) runs only this mode, forward only.
SM120_FP8_QUANT_MODE = 2


class FP8BackwardUnsupportedError(RuntimeError):
    """Raised when gradients are requested from a forward-only FP8 path (CUTLASS on SM120)."""


def check_fp8_quant_mode(fp8_quant_mode: int) -> None:
    """``ValueError`` unless ``fp8_quant_mode`` is an int in 0..5 (FP8 on)."""
    if isinstance(fp8_quant_mode, bool) or not isinstance(fp8_quant_mode, int) or not (
        0 <= fp8_quant_mode <= MAX_FP8_QUANT_MODE
    ):
        raise ValueError(
            f"fp8_quant_mode must be an int in [0, {MAX_FP8_QUANT_MODE}] for FP8 attention "
            f"(0 cast, 1 two-direction, 2 per-block, 3 per-head, 4 per-batch, 5 per-tensor); "
            f"got {fp8_quant_mode!r}"
        )


def _capability(device: torch.device) -> Tuple[int, int]:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA device for tensors on {device}")
    return cast(Tuple[int, int], tuple(torch.cuda.get_device_capability(device)))


def check_fp8_support(
    kernel,
    fp8_quant_mode: int,
    head_dim_qk: int,
    head_dim_v: int,
    device: torch.device,
) -> bool:
    """Refuse FP8 attention that ``kernel`` cannot run on ``device``.

    Args:
        kernel: :class:`HSTUKernel` (or its name); ``AUTO`` must be resolved first.
        fp8_quant_mode: 0..5.
        head_dim_qk: q/k head dim ``Dqk``.
        head_dim_v: v head dim ``Dv``.
        device: the device of q/k/v.

    Returns:
        Whether the backward pass is supported (False only for CUTLASS on SM120).

    Raises:
        ValueError: bad mode, head dims or kernel (names the argument).
        RuntimeError: the device cannot run FP8 with this kernel.
    """
    kernel = to_kernel(kernel)
    check_fp8_quant_mode(fp8_quant_mode)
    if kernel == HSTUKernel.AUTO:
        raise ValueError("kernel must be resolved (PYTORCH, TRITON or CUTLASS) before the FP8 gate; got AUTO")
    if kernel == HSTUKernel.PYTORCH:
        return True
    if kernel == HSTUKernel.CUTLASS:
        if head_dim_qk != head_dim_v:
            raise ValueError(
                f"kernel=CUTLASS needs attention_dim == hidden_dim (q and v head dims); got "
                f"{head_dim_qk} and {head_dim_v}"
            )
        if head_dim_qk not in CUTLASS_FP8_HEAD_DIMS:
            raise ValueError(
                f"attention_dim (head dim) must be one of {CUTLASS_FP8_HEAD_DIMS} for FP8 attention "
                f"with kernel=CUTLASS; got {head_dim_qk}"
            )
    if is_tracing():
        return True
    try:
        major, minor = _capability(device)
    except RuntimeError as err:
        raise RuntimeError(
            f"kernel={kernel.value} with fp8_quant_mode={fp8_quant_mode} needs CUDA tensors "
            f"({err}); use kernel=PYTORCH for the FP8 emulation on {device}"
        ) from None
    arch = f"SM{major}{minor}"
    if kernel == HSTUKernel.TRITON:
        if (major, minor) < TRITON_FP8_MIN_CAPABILITY:
            raise RuntimeError(
                f"kernel=TRITON FP8 attention needs SM89 or newer (FP8 tensor cores); this device is "
                f"{arch}. Use fp8_quant_mode=-1 (bf16/fp16) or kernel=PYTORCH (emulation)."
            )
        return True
    # CUTLASS
    if major == 9:
        return True
    if major == 12:
        if fp8_quant_mode != SM120_FP8_QUANT_MODE:
            raise RuntimeError(
                f"kernel=CUTLASS on {arch} (Blackwell RTX) runs FP8 only with fp8_quant_mode="
                f"{SM120_FP8_QUANT_MODE} (forward only); got fp8_quant_mode={fp8_quant_mode}. "
                "The wheel would silently run bf16/fp16 instead, so this is refused."
            )
        return False
    raise RuntimeError(
        f"kernel=CUTLASS has no FP8 attention on {arch}: FP8 needs SM90 (all modes) or SM120 "
        f"(mode {SM120_FP8_QUANT_MODE}, forward only). Use fp8_quant_mode=-1, kernel=TRITON "
        "(SM89+) or kernel=PYTORCH (emulation)."
    )


class _RefuseBackward(torch.autograd.Function):
    """Identity whose backward raises (marks a forward-only FP8 result)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, message: str) -> torch.Tensor:  # type: ignore[override]
        ctx.message = message
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        raise FP8BackwardUnsupportedError(ctx.message)


def refuse_backward(x: torch.Tensor, message: str) -> torch.Tensor:
    """``x`` unchanged; a backward pass through it raises :class:`FP8BackwardUnsupportedError`."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _RefuseBackward.apply(x, message)
