"""``torchrec_hstu::hstu_fp8_fwd``: the whole FP8 attention forward (quantize + kernel) as one
opaque custom op, for ``torch.export`` / AOTInductor (notes decision 8).

The quantizers read per-sequence lengths and build descale tensors whose sizes depend on the
data; traced op by op they would raise data-dependent guard errors or leave unbacked sizes in
the graph. Inside one custom op with a fake impl (``v.new_empty([L, H, Dv])``) the exported
graph holds a single node per attention call.

:func:`torchrec_hstu.ops.hstu_attention.hstu_attention` calls it only under
``torch.compiler.is_exporting()``; eager training and evaluation never do (autograd stays on
the direct path). The op has no autograd formula: it is for inference graphs.

The op carries the kernel the model was exported with (``kernel``: the resolved
:class:`~torchrec_hstu.ops.common.HSTUKernel` name). Implementations (notes decisions 4 and 8):
on CPU (and any non-CUDA device) every kernel's FP8 definition is computed by the exact
emulation, so a model exported for a GPU kernel still runs on a CPU; on CUDA the op runs exactly
the recorded kernel through the backend table (:func:`~torchrec_hstu.ops.backends.select_backend`
and :func:`~torchrec_hstu.ops.backends.run_attention`: PYTORCH -> the emulation, TRITON -> the
Triton FP8 kernel, CUTLASS -> the wheel) and, where that kernel cannot run (no Triton, no wheel, a GPU below its FP8 gate),
raises the dispatcher's error naming kernel and mode instead of falling back to another kernel.
The choice is logged once per device.
"""

import logging
from typing import Optional, Set, Union

import torch

from torchrec_hstu.ops.backends import AttentionRequest, run_attention, select_backend
from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel, to_kernel
from torchrec_hstu.ops.custom_ops import ATTENTION_TENSORS, attention_output_fake, define_attention_op

logger = logging.getLogger(__name__)

OP_NAME = "torchrec_hstu::hstu_fp8_fwd"
_logged: Set[str] = set()


def _log_choice(device: torch.device, choice: str) -> None:
    key = f"{device.type}:{choice}"
    if key not in _logged:
        _logged.add(key)
        logger.info("%s runs FP8 attention on %s with %s", OP_NAME, device, choice)


def _emulated(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    kernel: str,
) -> torch.Tensor:
    """CPU / default implementation: the exact emulation, for every recorded kernel."""
    from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated

    to_kernel(kernel)  # a malformed graph fails here, not silently
    _log_choice(q.device, f"the PyTorch emulation (exported kernel {kernel})")
    with torch.no_grad():
        return fp8_hstu_attention_emulated(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)


def _on_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    kernel: str,
) -> torch.Tensor:
    """CUDA implementation: exactly the exported ``kernel``, or the error saying why it cannot run."""
    with torch.no_grad():
        request = AttentionRequest.for_call(q, v, options, max_seq_len, num_targets, k=k)
        backend = select_backend(kernel, request)
        out = run_attention(backend, q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
    _log_choice(q.device, f"the {kernel} kernel ({backend.name})")
    return out


_hstu_fp8_fwd = define_attention_op(
    OP_NAME,
    ATTENTION_TENSORS,
    impl=_emulated,
    fake=attention_output_fake,
    trailing=("str kernel",),
    cuda_impl=_on_cuda,
    module=__name__,
)


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
    """The FP8 forward as one op (same arguments as the kernels); ``kernel`` is stored in the
    graph by name and the CUDA implementation runs exactly it.

    Args:
        q: ``[L, H, Dqk]``.
        k: ``[L, H, Dqk]``.
        v: ``[L, H, Dv]``.
        seq_offsets: ``[B + 1]``.
        max_seq_len: batch maximum length.
        alpha: scale of ``q k^T``.
        options: mask options and ``fp8_quant_mode`` (0..5).
        num_targets: optional ``[B]``.
        kernel: the resolved kernel (PYTORCH, TRITON or CUTLASS).

    Returns:
        ``[L, H, Dv]`` in the dtype of ``q``.
    """
    return _hstu_fp8_fwd(q, k, v, seq_offsets, num_targets, max_seq_len, float(alpha), options, to_kernel(kernel).name)
