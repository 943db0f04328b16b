"""Adapter to the optional CUTLASS HSTU attention wheel (``fbgemm_gpu_hstu``: ``from hstu import
hstu_attn_varlen_func``), bf16/fp16 and FP8 (``quant_mode``).

Two signatures of ``hstu_attn_varlen_func`` exist (``anchor-cutlass-fp8.md`` 1 and 1b) and are
told apart with :func:`inspect.signature`:

* legacy (recsys-examples ``corelib/hstu/hopper``): ``(q, k, v, cu_seqlens_q, cu_seqlens_k,
  max_seqlen_q, max_seqlen_k, num_contexts=None, num_targets=None, target_group_size=1,
  window_size=(-1, -1), alpha=1.0, rab=None, has_drab=False, func=None, quant_mode=-1,
  scaling_seqlen=-1)``;
* fork (FBGEMM ``experimental/hstu``, what TorchEasyRec pins): ``(q, k, v, cu_seqlens_q,
  cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, scaling_seqlen, num_contexts,
  num_targets, target_group_size=1, window_size=(-1, -1), alpha=1.0, rab=None, has_drab=False,
  ..., func=None, quant_mode=-1)`` with ``seqused_*``, ``scaling_seqlen``, ``num_contexts`` and
  ``num_targets`` required.

Every argument is passed by keyword, only if the signature has it; a feature the installed
wheel lacks (``quant_mode`` for FP8, ``func`` for SLA, ``scaling_seqlen`` other than
``max_seq_len``) is refused, never dropped. The wheel is never required: without it
:func:`cutlass_hstu_attention` raises. The FP8 arch gate lives in the dispatcher
(:func:`torchrec_hstu.ops.fp8.dispatch.fp8_hstu_attention`), not here.

Mask mapping (as TorchEasyRec does): causal -> ``window_size=(-1, 0)``; ``max_attn_len=W`` ->
``(W, 0)``; not causal -> ``(-1, -1)``; ``contextual_seq_len`` -> ``num_contexts`` (int32
``[B]``); ``num_targets`` -> int32 ``[B]``; Semi-Local Attention -> ``func`` (the NFUNC=3
``[H, 3, L]`` int32 tensor of :func:`build_sla_func_tensor`) with ``window_size=(-1, 0)``.
Limits of the kernel (refused with ``ValueError``): float16/bfloat16 only,
``attention_dim == hidden_dim``, a window cannot be combined with a contextual prefix or targets,
``min_full_attn_seq_len`` is not supported.
"""

import importlib
import inspect
import logging
from typing import Any, Callable, Dict, Optional

import torch

from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.jagged import jagged_token_positions

logger = logging.getLogger(__name__)

#: Arguments the fork's signature requires positionally (no defaults).
_FORK_ONLY_ARGS = ("seqused_q", "seqused_k")


def load_hstu_attn_varlen_func() -> Optional[Callable[..., torch.Tensor]]:
    """``hstu.hstu_attn_varlen_func`` if the wheel imports, else None (looked up on every call,
    so a module placed on ``sys.modules`` is picked up)."""
    try:
        module = importlib.import_module("hstu")
    except ImportError:
        return None
    try:  # registers the wheel's op schemas (needed to load AOTI packages); optional.
        importlib.import_module("hstu.hstu_ops_gpu")
    except ImportError:
        pass
    return getattr(module, "hstu_attn_varlen_func", None)


def cutlass_available() -> bool:
    """Whether the CUTLASS HSTU wheel is importable."""
    return load_hstu_attn_varlen_func() is not None


def build_sla_func_tensor(
    num_heads: int,
    sla_k1: int,
    sla_k2: int,
    seq_offsets: torch.Tensor,
    total_len: int,
    num_targets: Optional[torch.Tensor] = None,
    contextual_seq_len: int = 0,
) -> torch.Tensor:
    """Semi-Local Attention as the kernel's arbitrary mask (NFUNC = 3 intervals per query).

    Query ``p`` of sequence ``b`` sees keys ``[0, f0) U [f1, f2)`` (sequence-local). With
    ``K2 = max(sla_k2, contextual_seq_len)`` and ``H_b = max(len_b - num_targets_b, 0)``:
    a history query (``p < H_b``) gets ``f0 = min(p + 1, K2)``, ``f1 = max(p - sla_k1 + 1, K2)``,
    ``f2 = p + 1``; a target query gets ``f0 = f1 = f2 = H_b`` (all history, not itself), the
    same rule as :func:`torchrec_hstu.ops.masks.sla_attention_mask`.

    Args:
        num_heads: ``H``.
        sla_k1: local window.
        sla_k2: global prefix.
        seq_offsets: ``[B + 1]``.
        total_len: ``L``.
        num_targets: optional ``[B]``.
        contextual_seq_len: contextual prefix length.

    Returns:
        ``[H, 3, L]`` int32 (contiguous; identical for every head).
    """
    if sla_k1 < 0 or sla_k2 < 0 or contextual_seq_len < 0:
        raise ValueError(
            f"sla_k1, sla_k2 and contextual_seq_len must be >= 0; got {sla_k1}, {sla_k2}, {contextual_seq_len}"
        )
    offsets = seq_offsets.to(torch.int64)
    batch_ids, positions = jagged_token_positions(offsets, total_len)
    lengths = offsets[1:] - offsets[:-1]
    history_end = lengths
    if num_targets is not None:
        history_end = torch.clamp(lengths - num_targets.to(device=offsets.device, dtype=torch.int64), min=0)
    history_end = history_end[batch_ids]
    global_prefix = max(sla_k2, contextual_seq_len)
    is_target = positions >= history_end
    col_max0 = torch.where(is_target, history_end, torch.clamp(positions + 1, max=global_prefix))
    col_min0 = torch.where(is_target, history_end, torch.clamp(positions - sla_k1 + 1, min=global_prefix))
    col_max1 = torch.where(is_target, history_end, positions + 1)
    func = torch.stack([col_max0, col_min0, col_max1]).to(torch.int32)  # [3, L]
    return func.unsqueeze(0).expand(num_heads, 3, total_len).contiguous()


def _window_size(options: AttentionOptions) -> tuple:
    if options.use_sla or (options.causal and options.max_attn_len == 0):
        return (-1, 0)
    if options.causal:
        return (options.max_attn_len, 0)
    return (-1, -1)


def _check_options(
    q: torch.Tensor, v: torch.Tensor, options: AttentionOptions, num_targets: Optional[torch.Tensor]
) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"kernel=CUTLASS needs float16/bfloat16 q/k/v (FP8 is quantized inside the kernel); "
            f"got {q.dtype}. Cast the model (mixed precision) or use kernel=PYTORCH."
        )
    if q.shape[2] != v.shape[2]:
        raise ValueError(
            f"kernel=CUTLASS needs attention_dim == hidden_dim (q and v head dims); got "
            f"{q.shape[2]} and {v.shape[2]}"
        )
    if options.min_full_attn_seq_len > 0:
        raise ValueError(
            f"kernel=CUTLASS does not support min_full_attn_seq_len > 0; got "
            f"{options.min_full_attn_seq_len}. Use kernel=PYTORCH or TRITON."
        )
    has_context_or_targets = options.contextual_seq_len > 0 or num_targets is not None
    if not options.use_sla and options.max_attn_len > 0 and has_context_or_targets:
        raise ValueError(
            "kernel=CUTLASS cannot combine a window (max_attn_len > 0) with contextual_seq_len > 0 "
            f"or num_targets; got max_attn_len={options.max_attn_len}, "
            f"contextual_seq_len={options.contextual_seq_len}, num_targets "
            f"{'given' if num_targets is not None else 'None'}. Use kernel=PYTORCH or TRITON."
        )
    if not options.causal and has_context_or_targets:
        raise ValueError(
            "kernel=CUTLASS supports contextual_seq_len / num_targets only with causal=True"
        )


def cutlass_call_kwargs(
    fn: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """Keyword arguments of ``hstu_attn_varlen_func`` for this call, for ``fn``'s signature.

    Raises ``ValueError`` when the call needs a parameter ``fn`` does not have.
    """
    params = inspect.signature(fn).parameters
    batch_size = seq_offsets.numel() - 1
    cu_seqlens = seq_offsets.to(torch.int32)
    scaling_seqlen = options.resolve_scaling_seqlen(max_seq_len)
    kwargs: Dict[str, Any] = dict(
        q=q.contiguous(),
        k=k.contiguous(),
        v=v.contiguous(),
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seq_len,
        max_seqlen_k=max_seq_len,
        num_contexts=(
            torch.full((batch_size,), options.contextual_seq_len, dtype=torch.int32, device=q.device)
            if options.contextual_seq_len > 0
            else None
        ),
        num_targets=None if num_targets is None else num_targets.to(torch.int32),
        target_group_size=1,
        window_size=_window_size(options),
        alpha=alpha,
        rab=None,
        has_drab=False,
    )
    if all(name in params for name in _FORK_ONLY_ARGS):
        kwargs.update(seqused_q=None, seqused_k=None)
    if "scaling_seqlen" in params:
        kwargs["scaling_seqlen"] = scaling_seqlen
    elif scaling_seqlen != max_seq_len:
        raise ValueError(
            f"the installed hstu wheel has no scaling_seqlen parameter, so scaling_seqlen="
            f"{options.scaling_seqlen} (!= max_seq_len={max_seq_len}) cannot be honoured"
        )
    if options.use_sla:
        if "func" not in params:
            raise ValueError("the installed hstu wheel has no func (arbitrary mask) parameter: SLA is unsupported")
        kwargs["func"] = build_sla_func_tensor(
            q.shape[1],
            options.sla_k1,
            options.sla_k2,
            seq_offsets,
            q.shape[0],
            num_targets=num_targets,
            contextual_seq_len=options.contextual_seq_len,
        )
    if options.use_fp8:
        if "quant_mode" not in params:
            raise ValueError(
                f"fp8_quant_mode={options.fp8_quant_mode} needs an hstu wheel whose "
                "hstu_attn_varlen_func takes quant_mode; the installed one does not (refusing to run bf16)"
            )
        kwargs["quant_mode"] = options.fp8_quant_mode
    missing = [
        name
        for name, param in params.items()
        if param.default is inspect.Parameter.empty
        and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
        and name not in kwargs
    ]
    if missing:
        raise ValueError(f"unknown hstu_attn_varlen_func signature: cannot fill required arguments {missing}")
    return {name: value for name, value in kwargs.items() if name in params}


def cutlass_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """HSTU attention by the CUTLASS wheel (bf16/fp16, or FP8 when ``options.fp8_quant_mode >= 0``).

    Args:
        q: ``[L, H, D]`` float16/bfloat16.
        k: ``[L, H, D]``.
        v: ``[L, H, D]`` (``attention_dim == hidden_dim``).
        seq_offsets: ``[B + 1]``.
        max_seq_len: batch maximum length.
        alpha: scale of ``q k^T``.
        options: mask / numerics options.
        num_targets: optional ``[B]``.

    Returns:
        ``[L, H, D]`` in the dtype of ``q`` (the legacy wheel's FP8 float16 output is cast back).

    Raises:
        RuntimeError: the wheel is not installed.
        ValueError: the call needs something the kernel or the installed wheel cannot do.
    """
    fn = load_hstu_attn_varlen_func()
    if fn is None:
        raise RuntimeError(
            "kernel=CUTLASS needs the fbgemm_gpu_hstu wheel (`from hstu import hstu_attn_varlen_func`), "
            "which is not installed; use kernel=TRITON or PYTORCH"
        )
    _check_options(q, v, options, num_targets)
    kwargs = cutlass_call_kwargs(fn, q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
    out = fn(**kwargs)
    return out if out.dtype == q.dtype else out.to(q.dtype)
