"""Triton kernels for HSTU attention on CUDA (bf16/fp16/fp32 and FP8), Hopper-tuned.

Import :mod:`torchrec_hstu.ops.triton.hstu_attention` (``triton_hstu_attention``) or
:mod:`torchrec_hstu.ops.triton.fp8_attention` (``triton_fp8_hstu_attention``); importing this
package alone imports no Triton code.
"""
