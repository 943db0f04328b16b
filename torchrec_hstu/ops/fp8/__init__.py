"""FP8 HSTU attention (``fp8_quant_mode`` 0..5): quantizers, the exact emulation of the CUTLASS
kernel and the arch gate. FP8 runs through :func:`torchrec_hstu.ops.hstu_attention` like every
other precision; the ``torchrec_hstu::hstu_fp8_fwd`` export op lives in :mod:`.export_op`
(registered by importing :mod:`torchrec_hstu.ops`).
"""

from torchrec_hstu.ops.fp8.arch import (
    FP8BackwardUnsupportedError,
    check_fp8_quant_mode,
    check_fp8_support,
)
from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated
from torchrec_hstu.ops.fp8.quantize import (
    FP8_DTYPE,
    FP8_MAX,
    FP8Quantized,
    FP8TileSizes,
    quantize_blockwise,
    quantize_cast,
    quantize_colwise,
    quantize_for_mode,
    quantize_per_sample,
    quantize_per_sample_head,
    quantize_per_tensor,
    quantize_rowwise,
    quantize_tiles,
    saturate_to_fp8,
)

__all__ = [
    "FP8BackwardUnsupportedError",
    "FP8Quantized",
    "FP8TileSizes",
    "FP8_DTYPE",
    "FP8_MAX",
    "check_fp8_quant_mode",
    "check_fp8_support",
    "fp8_hstu_attention_emulated",
    "quantize_blockwise",
    "quantize_cast",
    "quantize_colwise",
    "quantize_for_mode",
    "quantize_per_sample",
    "quantize_per_sample_head",
    "quantize_per_tensor",
    "quantize_rowwise",
    "quantize_tiles",
    "saturate_to_fp8",
]
