"""Pure functions on jagged tensors (values + offsets): HSTU attention and its pieces."""

from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel
from torchrec_hstu.ops.delta_attention import delta_hstu_attention, delta_hstu_mha
from torchrec_hstu.ops.hstu_attention import hstu_attention, hstu_mha, resolve_kernel
from torchrec_hstu.ops.hstu_compute import (
    hstu_compute_output,
    hstu_compute_uqvk,
    hstu_preprocess_and_attention,
)
from torchrec_hstu.ops.jagged import (
    concat_2D_jagged,
    dense_to_jagged,
    jagged_to_padded_dense,
    lengths_to_offsets,
    offsets_to_lengths,
    split_2D_jagged,
)
from torchrec_hstu.ops.masks import hstu_attention_mask, sla_attention_mask

__all__ = [
    "AttentionOptions",
    "HSTUKernel",
    "concat_2D_jagged",
    "delta_hstu_attention",
    "delta_hstu_mha",
    "dense_to_jagged",
    "hstu_attention",
    "hstu_attention_mask",
    "hstu_compute_output",
    "hstu_compute_uqvk",
    "hstu_mha",
    "hstu_preprocess_and_attention",
    "jagged_to_padded_dense",
    "lengths_to_offsets",
    "offsets_to_lengths",
    "resolve_kernel",
    "sla_attention_mask",
    "split_2D_jagged",
]
