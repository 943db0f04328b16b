"""The functional pieces of one STU layer, so kernels can replace them one by one.

``x: [L, d]`` are jagged token embeddings; ``H`` heads, ``hidden_dim`` (u, v per head),
``attention_dim`` (q, k per head).

1. :func:`hstu_compute_uqvk`: ``LayerNorm(x) @ W_uvqk + b`` split into u, v, q, k; ``u = silu(u)``
   (``uvqk_activation="all"``: silu on u, v, q and k, as GR's research HSTU).
2. :func:`hstu_preprocess_and_attention`: 1 + :func:`hstu_attention`.
3. :func:`hstu_compute_output`: ``x + dropout([u, a, u * Norm(a)]) @ W_out``.
"""

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel, check_uvqk_activation, is_tracing
from torchrec_hstu.ops.hstu_attention import hstu_attention


def _maybe_checkpoint(enabled: bool, fn, *args):
    # Recompute in backward instead of saving activations (the anchors' recompute_* flags).
    # Not while tracing: an exported graph has no backward to recompute in.
    if enabled and not is_tracing() and torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    ):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def hstu_compute_uqvk(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    norm_eps: float,
    num_heads: int,
    attention_dim: int,
    hidden_dim: int,
    uvqk_weight: torch.Tensor,
    uvqk_bias: torch.Tensor,
    recompute_normed_x: bool = False,
    recompute_uvqk: bool = False,
    uvqk_activation: str = "u",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input LayerNorm, the fused ``[u | v | q | k]`` projection and ``silu(u)`` (or silu on
    all four).

    Args:
        x: ``[L, d]``.
        norm_weight: ``[d]`` input LayerNorm weight.
        norm_bias: ``[d]`` input LayerNorm bias.
        norm_eps: LayerNorm epsilon.
        num_heads: ``H``.
        attention_dim: q/k head dim.
        hidden_dim: u/v head dim.
        uvqk_weight: ``[d, (2 * hidden_dim + 2 * attention_dim) * H]``.
        uvqk_bias: ``[(2 * hidden_dim + 2 * attention_dim) * H]``.
        recompute_normed_x: recompute the LayerNorm in backward instead of saving it.
        recompute_uvqk: recompute the projection in backward instead of saving it.
        uvqk_activation: ``"u"``: silu on u only (GR's production STU); ``"all"``: silu on
            u, v, q and k (GR's research HSTU, the paper's phi_1).

    Returns:
        ``u [L, H * hidden_dim]`` (after silu), ``q [L, H, attention_dim]``,
        ``k [L, H, attention_dim]``, ``v [L, H, hidden_dim]``.
    """
    if x.dim() != 2 or x.shape[1] != uvqk_weight.shape[0]:
        raise ValueError(
            f"x must be [L, d] with d={uvqk_weight.shape[0]} (uvqk_weight rows); got {tuple(x.shape)}"
        )
    expected_width = (2 * hidden_dim + 2 * attention_dim) * num_heads
    if uvqk_weight.shape[1] != expected_width:
        raise ValueError(
            f"uvqk_weight must have (2*hidden_dim + 2*attention_dim)*num_heads = {expected_width} "
            f"columns; got {uvqk_weight.shape[1]}"
        )
    check_uvqk_activation(uvqk_activation)
    dtype = x.dtype

    def normed(x_: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x_, (x_.shape[-1],), norm_weight.to(dtype), norm_bias.to(dtype), norm_eps)

    def activated(uvqk_: torch.Tensor) -> torch.Tensor:
        return F.silu(uvqk_) if uvqk_activation == "all" else uvqk_

    def project(x_: torch.Tensor) -> torch.Tensor:
        return activated(torch.addmm(uvqk_bias.to(dtype), normed(x_), uvqk_weight.to(dtype)))

    if recompute_uvqk:
        uvqk = _maybe_checkpoint(True, project, x)
    else:
        normed_x = _maybe_checkpoint(recompute_normed_x, normed, x)
        uvqk = activated(torch.addmm(uvqk_bias.to(dtype), normed_x, uvqk_weight.to(dtype)))
    u, v, q, k = torch.split(
        uvqk,
        [hidden_dim * num_heads, hidden_dim * num_heads, attention_dim * num_heads, attention_dim * num_heads],
        dim=1,
    )
    if uvqk_activation == "u":
        u = F.silu(u)
    q = q.reshape(-1, num_heads, attention_dim)
    k = k.reshape(-1, num_heads, attention_dim)
    v = v.reshape(-1, num_heads, hidden_dim)
    return u, q, k, v


def hstu_preprocess_and_attention(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    norm_eps: float,
    num_heads: int,
    attention_dim: int,
    hidden_dim: int,
    uvqk_weight: torch.Tensor,
    uvqk_bias: torch.Tensor,
    max_seq_len: int,
    seq_offsets: torch.Tensor,
    attn_alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
    kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
    recompute_normed_x: bool = False,
    recompute_uvqk: bool = False,
    cache: Optional[Dict[str, Any]] = None,
    check_values: bool = True,
    uvqk_activation: str = "u",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hstu_compute_uqvk` followed by :func:`hstu_attention`.

    Args:
        x: ``[L, d]``.
        norm_weight, norm_bias, norm_eps: input LayerNorm.
        num_heads, attention_dim, hidden_dim: head layout.
        uvqk_weight, uvqk_bias: fused projection.
        max_seq_len: batch maximum length.
        seq_offsets: ``[B + 1]``.
        attn_alpha: scale of ``q k^T``.
        options: attention options (mask, ``scaling_seqlen``, ``fp8_quant_mode``).
        num_targets: optional ``[B]``.
        kernel: attention kernel.
        recompute_normed_x, recompute_uvqk: activation recompute flags.
        cache: per-batch attention cache shared across layers.
        check_values: check the batch's values in the attention (one host sync); False when
            the caller checked them at its edge.
        uvqk_activation: ``"u"`` (silu on u) or ``"all"`` (silu on u, v, q, k).

    Returns:
        ``u [L, H * hidden_dim]``, ``attn [L, H * hidden_dim]``, ``k [L, H, Dqk]``, ``v [L, H, Dv]``
        (k and v for KV caching).
    """
    u, q, k, v = hstu_compute_uqvk(
        x,
        norm_weight,
        norm_bias,
        norm_eps,
        num_heads,
        attention_dim,
        hidden_dim,
        uvqk_weight,
        uvqk_bias,
        recompute_normed_x=recompute_normed_x,
        recompute_uvqk=recompute_uvqk,
        uvqk_activation=uvqk_activation,
    )
    attn = hstu_attention(
        q,
        k,
        v,
        seq_offsets,
        max_seq_len,
        attn_alpha,
        options,
        num_targets=num_targets,
        kernel=kernel,
        cache=cache,
        check_values=check_values,
    )
    return u, attn.reshape(-1, num_heads * hidden_dim), k, v


def hstu_compute_output(
    attn: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    norm_eps: float,
    output_weight: torch.Tensor,
    num_heads: int,
    hidden_dim: int,
    dropout_ratio: float,
    training: bool,
    use_group_norm: bool = False,
    recompute_y: bool = False,
) -> torch.Tensor:
    """``x + dropout([u, attn, u * Norm(attn)]) @ output_weight`` (residual, no bias).

    The norm and product are computed in float32 (float64 for float64 inputs) and cast back
    to ``x``'s dtype.

    Args:
        attn: ``[L, H * hidden_dim]`` attention output.
        u: ``[L, H * hidden_dim]`` gate (already silu'd).
        x: ``[L, d]`` layer input (residual).
        norm_weight, norm_bias: ``[H * hidden_dim]`` (LayerNorm) or ``[H]`` (GroupNorm).
        norm_eps: norm epsilon.
        output_weight: ``[3 * H * hidden_dim, d]``.
        num_heads, hidden_dim: head layout.
        dropout_ratio: dropout on the concatenation.
        training: dropout active.
        use_group_norm: per-head GroupNorm instead of LayerNorm over all heads.
        recompute_y: recompute the concatenation in backward instead of saving it.

    Returns:
        ``[L, d]``.
    """

    # float32 for half precision, float64 stays float64.
    compute_dtype = torch.promote_types(x.dtype, torch.float32)

    def compute_y(attn_: torch.Tensor, u_: torch.Tensor) -> torch.Tensor:
        a32, u32 = attn_.to(compute_dtype), u_.to(compute_dtype)
        weight, bias = norm_weight.to(compute_dtype), norm_bias.to(compute_dtype)
        if use_group_norm:
            normed = F.group_norm(
                a32.reshape(-1, num_heads, hidden_dim), num_heads, weight, bias, norm_eps
            ).reshape(-1, num_heads * hidden_dim)
        else:
            normed = F.layer_norm(a32, (a32.shape[-1],), weight, bias, norm_eps)
        y = torch.cat([u32, a32, u32 * normed], dim=1)
        return F.dropout(y, p=dropout_ratio, training=training).to(x.dtype)

    # Dropout inside a checkpoint replays the same mask (checkpoint preserves RNG state).
    y = _maybe_checkpoint(recompute_y, compute_y, attn, u)
    return torch.addmm(x, y, output_weight.to(x.dtype))
