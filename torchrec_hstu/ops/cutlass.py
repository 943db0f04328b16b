"""Adapter to the optional CUTLASS HSTU attention wheels, bf16/fp16 and FP8.

Three signatures of ``hstu_attn_varlen_func`` exist. Two come from NVIDIA / TorchEasyRec's
``fbgemm_gpu_hstu`` wheel (``from hstu import hstu_attn_varlen_func``; ``anchor-cutlass-fp8.md``
1 and 1b), told apart with :func:`inspect.signature`:

* legacy (recsys-examples ``corelib/hstu/hopper``): ``(q, k, v, cu_seqlens_q, cu_seqlens_k,
  max_seqlen_q, max_seqlen_k, num_contexts=None, num_targets=None, target_group_size=1,
  window_size=(-1, -1), alpha=1.0, rab=None, has_drab=False, func=None, quant_mode=-1,
  scaling_seqlen=-1)``;
* fork (FBGEMM ``experimental/hstu``, what TorchEasyRec pins): ``(q, k, v, cu_seqlens_q,
  cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, scaling_seqlen, num_contexts,
  num_targets, target_group_size=1, window_size=(-1, -1), alpha=1.0, rab=None, has_drab=False,
  ..., func=None, quant_mode=-1)`` with ``seqused_*``, ``scaling_seqlen``, ``num_contexts`` and
  ``num_targets`` required.

The third is FBGEMM's published wheel (``fbgemm-gpu-hstu-nightly``, ``from
fbgemm_gpu.experimental.hstu import hstu_attn_varlen_func``): ``(q, k, v, seq_offsets_q,
seq_offsets_k, max_seqlen_q, max_seqlen_k, num_contexts, num_targets, target_group_size=1,
window_size=(-1, -1), alpha=1.0, rab=None, has_drab=False, is_delta_q=False, descale_q=None,
descale_k=None, descale_v=None)``: no ``scaling_seqlen`` (it divides by ``max_seqlen_q``; the
output is linear in ``1 / scaling_seqlen``, so another divisor is an exact rescale), no
arbitrary mask (SLA is refused), FP8 forward only through per-tensor ``descale_*`` tensors, and
delta queries (``is_delta_q``, without contexts or targets). :func:`find_cutlass_wheel` looks
for ``hstu`` first, then FBGEMM's.

Every argument is passed by keyword, only if the signature has it; a feature the installed
wheel lacks (``quant_mode`` for FP8, ``func`` for SLA, ``scaling_seqlen`` other than
``max_seq_len``) is refused, never dropped. The wheel is never required: without it
:func:`cutlass_hstu_attention` raises. The FP8 arch gate lives in the backend table
(:func:`torchrec_hstu.ops.backends.run_attention`), not here. Under ``torch.export`` the call
is one opaque op, ``torchrec_hstu::cutlass_hstu_fwd``, that runs the wheel when the package
runs.

Mask mapping (as TorchEasyRec does): causal -> ``window_size=(-1, 0)``; ``max_attn_len=W`` ->
``(W, 0)``; not causal -> ``(-1, -1)``; ``contextual_seq_len`` -> ``num_contexts`` (int32
``[B]``); ``num_targets`` -> int32 ``[B]``; Semi-Local Attention -> ``func`` (the NFUNC=3
``[H, 3, L]`` int32 tensor of :func:`build_sla_func_tensor`) with ``window_size=(-1, 0)``.
Limits of the kernel (refused with ``ValueError``): float16/bfloat16 only,
``attention_dim == hidden_dim``, a window cannot be combined with a contextual prefix or targets,
``min_full_attn_seq_len`` is not supported.
"""

import dataclasses
import importlib
import inspect
import logging
import sys
from typing import Any, Callable, Dict, Optional, Set

import torch

from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.custom_ops import ATTENTION_TENSORS, attention_output_fake, define_attention_op
from torchrec_hstu.ops.fp8.quantize import quantize_per_tensor
from torchrec_hstu.ops.jagged import jagged_token_positions

logger = logging.getLogger(__name__)

#: Arguments the fork's signature requires positionally (no defaults).
_FORK_ONLY_ARGS = ("seqused_q", "seqused_k")


@dataclasses.dataclass(frozen=True)
class CutlassWheel:
    """An importable CUTLASS HSTU wheel.

    Attributes:
        flavor: ``"legacy"`` / ``"fork"`` (the ``hstu`` module's two signatures) or
            ``"fbgemm"`` (``fbgemm_gpu.experimental.hstu``).
        fn: its ``hstu_attn_varlen_func``.
    """

    flavor: str
    fn: Callable[..., torch.Tensor]


#: Where each wheel lives, in the order they are looked for.
WHEEL_MODULES = ("hstu", "fbgemm_gpu.experimental.hstu")


#: Wheel modules whose import failed: not retried on every attention call (a failed import
#: searches the path each time); a module placed on ``sys.modules`` later is still found.
_MISSING: Set[str] = set()
#: Of those, the ones installed but not loadable, with the error (``cutlass_wheel_load_errors``).
_LOAD_ERRORS: Dict[str, str] = {}


def _import(name: str) -> Optional[Any]:
    module = sys.modules.get(name)
    if module is not None:
        return module
    if name in _MISSING:
        return None
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as err:
        _MISSING.add(name)
        missing = err.name if isinstance(err, ModuleNotFoundError) else None
        # Absent: the wheel module itself or a package above it (not a dependency it imports).
        absent = missing is not None and (name == missing or name.startswith(missing + "."))
        if not absent:
            # Installed but its library does not load (e.g. a CUDA 12 build without
            # libcudart.so.12 on the loader's path: OSError from dlopen): the wheel is not
            # available, and kernel=CUTLASS says why instead of a traceback from the import.
            _LOAD_ERRORS[name] = f"{type(err).__name__}: {err}"
            logger.warning("CUTLASS HSTU wheel %s is installed but does not load (%s)", name,
                           _LOAD_ERRORS[name])
        return None


def cutlass_wheel_load_errors() -> Dict[str, str]:
    """The CUTLASS wheel modules that are installed but failed to import, with their errors
    (absent wheels are not listed)."""
    return dict(_LOAD_ERRORS)


def find_cutlass_wheel() -> Optional[CutlassWheel]:
    """The first importable CUTLASS HSTU wheel, or None (looked up on every call, so a module
    placed on ``sys.modules`` is picked up)."""
    module = _import("hstu")
    if module is not None and hasattr(module, "hstu_attn_varlen_func"):
        # Registers the wheel's op schemas where the wheel ships them apart; optional.
        _import("hstu.hstu_ops_gpu")
        fn = module.hstu_attn_varlen_func
        flavor = "fork" if "seqused_q" in inspect.signature(fn).parameters else "legacy"
        return CutlassWheel(flavor, fn)
    module = _import("fbgemm_gpu.experimental.hstu")
    if module is not None and hasattr(module, "hstu_attn_varlen_func"):
        return CutlassWheel("fbgemm", module.hstu_attn_varlen_func)
    return None


def load_hstu_attn_varlen_func() -> Optional[Callable[..., torch.Tensor]]:
    """``hstu_attn_varlen_func`` of the importable wheel, or None."""
    wheel = find_cutlass_wheel()
    return None if wheel is None else wheel.fn


def cutlass_available() -> bool:
    """Whether a CUTLASS HSTU wheel is importable."""
    return find_cutlass_wheel() is not None


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


#: The ``fp8_quant_mode`` whose quantizers FBGEMM's wheel computes with its per-tensor descales
#: (q, k, v one scale each). Its P re-quantization differs from our per-tile rule: measured on
#: the H200 (2026-12-02), its output is 3.8e-2 rel-L2 from our mode-5 emulation (6.6e-2 to
#: 7.7e-2 from the other modes) and 5.42e-2 from the float64 result (emulation: 5.41e-2).
FBGEMM_FP8_QUANT_MODE = 5


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
        seq_offsets_q=cu_seqlens,
        seq_offsets_k=cu_seqlens,
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
    elif scaling_seqlen != max_seq_len and "is_delta_q" not in params:
        # FBGEMM's wheel (the one with is_delta_q) is rescaled exactly after the call.
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
    if options.use_fp8 and "descale_q" in params:
        if options.fp8_quant_mode != FBGEMM_FP8_QUANT_MODE:
            raise ValueError(
                f"fbgemm_gpu.experimental.hstu runs FP8 only as fp8_quant_mode={FBGEMM_FP8_QUANT_MODE} "
                f"(per-tensor descales); got fp8_quant_mode={options.fp8_quant_mode}"
            )
        for name, x in (("q", kwargs["q"]), ("k", kwargs["k"]), ("v", kwargs["v"])):
            quantized = quantize_per_tensor(x)
            kwargs[name] = quantized.values
            kwargs[f"descale_{name}"] = quantized.descale
    elif options.use_fp8:
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
    wheel = _require_wheel()
    _check_options(q, v, options, num_targets)
    if torch.compiler.is_exporting():
        # The wheels' ops take max_seqlen as a plain int (an exported batch's maximum length is
        # symbolic) and an AOTI package calling them directly crashed loading on the H200; the
        # exported graph holds one opaque op of ours instead, which calls the wheel at run time.
        return _cutlass_hstu_fwd(q, k, v, seq_offsets, num_targets, max_seq_len, float(alpha), options)
    return _run_wheel(wheel, q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)


def _run_wheel(
    wheel: CutlassWheel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor],
) -> torch.Tensor:
    kwargs = cutlass_call_kwargs(wheel.fn, q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
    out = wheel.fn(**kwargs)
    out = out if out.dtype == q.dtype else out.to(q.dtype)
    return _rescale(out, wheel, options, max_seq_len)


def _export_op_on_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor],
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
) -> torch.Tensor:
    # Straight to the wheel: AOTInductor may run the op while it compiles, still exporting.
    wheel = _require_wheel()
    _check_options(q, v, options, num_targets)
    with torch.no_grad():
        return _run_wheel(wheel, q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)


def _export_op_elsewhere(q: torch.Tensor, *args: Any) -> torch.Tensor:
    # A package exported with kernel=CUTLASS runs that kernel or refuses (never another kernel).
    raise RuntimeError(
        f"{EXPORT_OP_NAME} (a model exported with kernel=CUTLASS) runs on CUDA with a CUTLASS HSTU wheel; "
        f"got {q.device.type} tensors (export with kernel=TRITON or PYTORCH to serve elsewhere)"
    )


#: The CUTLASS forward as one opaque op in exported graphs (inference only: no autograd).
EXPORT_OP_NAME = "torchrec_hstu::cutlass_hstu_fwd"
_cutlass_hstu_fwd = define_attention_op(
    EXPORT_OP_NAME,
    ATTENTION_TENSORS,
    impl=_export_op_elsewhere,
    fake=attention_output_fake,
    cuda_impl=_export_op_on_cuda,
    module=__name__,
)


def _require_wheel() -> CutlassWheel:
    wheel = find_cutlass_wheel()
    if wheel is None:
        raise RuntimeError(
            "kernel=CUTLASS needs a CUTLASS HSTU wheel (`from hstu import hstu_attn_varlen_func`: "
            "fbgemm_gpu_hstu; or fbgemm_gpu.experimental.hstu: fbgemm-gpu-hstu-nightly), and "
            "neither is installed; use kernel=TRITON or PYTORCH"
        )
    return wheel


def _rescale(out: torch.Tensor, wheel: CutlassWheel, options: AttentionOptions, max_seq_len: int) -> torch.Tensor:
    # FBGEMM's kernel divides by max_seqlen_q; the output (and so every gradient) is linear in
    # 1 / scaling_seqlen, so another divisor is an exact rescale, never dropped.
    scaling_seqlen = options.resolve_scaling_seqlen(max_seq_len)
    if wheel.flavor != "fbgemm" or scaling_seqlen == max_seq_len:
        return out
    return out * (max_seq_len / scaling_seqlen)


def cutlass_delta_hstu_attention(
    delta_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    delta_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
    uniform_delta: Optional[int] = None,
) -> torch.Tensor:
    """Delta attention by FBGEMM's wheel (``is_delta_q``): the last ``d_b`` queries of each
    sequence against all its keys, bf16/fp16.

    Args:
        delta_q: ``[L', H, D]``.
        k: ``[L, H, D]`` full keys.
        v: ``[L, H, D]`` full values.
        seq_offsets: ``[B + 1]`` offsets of ``k``/``v``.
        delta_offsets: ``[B + 1]`` offsets of ``delta_q``.
        max_seq_len: batch maximum of the full lengths.
        alpha: scale of ``q k^T``.
        options: causal (optionally windowed) high-precision options.
        num_targets: must be None (the wheel's delta path has no targets).
        uniform_delta: ``d`` when every sequence has ``d`` delta rows (no host read).

    Returns:
        ``[L', H, D]`` in the dtype of ``delta_q``.
    """
    wheel = _require_wheel()
    if wheel.flavor != "fbgemm":
        raise ValueError(f"the installed CUTLASS wheel ({wheel.flavor}) has no delta queries")
    if num_targets is not None or options.contextual_seq_len > 0 or options.use_fp8:
        raise ValueError(
            "kernel=CUTLASS delta attention (is_delta_q) runs without num_targets, "
            "contextual_seq_len and FP8; use kernel=TRITON or PYTORCH"
        )
    _check_options(delta_q, v, options, None)
    if not options.causal:
        raise ValueError("kernel=CUTLASS delta attention (is_delta_q) needs causal=True")
    if uniform_delta is not None:
        max_delta = uniform_delta
    else:  # the longest query run bounds the kernel's grid: one host read
        delta_lengths = delta_offsets[1:] - delta_offsets[:-1]
        max_delta = int(delta_lengths.max()) if delta_lengths.numel() > 0 else 0
    out = wheel.fn(
        q=delta_q.contiguous(),
        k=k.contiguous(),
        v=v.contiguous(),
        seq_offsets_q=delta_offsets.to(torch.int32),
        seq_offsets_k=seq_offsets.to(torch.int32),
        max_seqlen_q=max(max_delta, 1),
        max_seqlen_k=max_seq_len,
        num_contexts=None,
        num_targets=None,
        target_group_size=1,
        window_size=_window_size(options),
        alpha=alpha,
        rab=None,
        has_drab=False,
        is_delta_q=True,
    )
    out = out if out.dtype == delta_q.dtype else out.to(delta_q.dtype)
    # The kernel divides by max_seqlen_q (the delta length) here; ours by scaling_seqlen.
    return out * (max(max_delta, 1) / options.resolve_scaling_seqlen(max_seq_len))
