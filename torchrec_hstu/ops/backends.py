"""The one table of HSTU attention backends: what each can do, whether it is here, which runs.

Every dispatch and every validation reads this table: :func:`hstu_attention`,
:func:`delta_hstu_attention`, the FP8 export op, config validation and ``AUTO``. A backend
declares its capabilities (:class:`BackendCapabilities`: dtypes, devices, head dims, mask
options, dropout, backward, FP8 modes forward / backward, delta queries, export); a call is
described by an :class:`AttentionRequest`; :func:`select_backend` honours an explicit kernel or
raises naming the capability it lacks, and resolves ``AUTO`` to the first backend that is
available and can do the request (a CUTLASS wheel, then TRITON, then PYTORCH), logging its
choice once.

The backends themselves (``ops/pytorch``, ``ops/triton``, ``ops/cutlass.py``, ``ops/fp8``)
import only ``ops/common.py`` and their own helpers, never this module, so the table sits above
them and nothing points back.
"""

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Dict, FrozenSet, Optional, Set, Tuple, TypedDict

import torch

from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel, is_tracing, to_kernel
from torchrec_hstu.ops.fp8.arch import check_fp8_support, refuse_backward

logger = logging.getLogger(__name__)

_ALL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_HALF_FLOATS = frozenset({torch.float16, torch.bfloat16})
_ALL_FP8_MODES = frozenset(range(6))


@dataclasses.dataclass(frozen=True)
class BackendCapabilities:
    """What one backend can run.

    Attributes:
        dtypes: q/k/v dtypes.
        devices: device types (``"cpu"``, ``"cuda"``).
        head_dims: allowed head dims (``Dqk`` and ``Dv``), or None for any up to ``max_head_dim``.
        max_head_dim: the largest head dim.
        equal_head_dims: ``Dqk`` must equal ``Dv``.
        non_causal: bidirectional attention.
        targets: ``num_targets``.
        contextual: ``contextual_seq_len > 0``.
        window: ``max_attn_len > 0``.
        window_with_targets_or_contextual: a window together with targets or a contextual prefix.
        non_causal_with_targets_or_contextual: ``causal=False`` together with targets or a
            contextual prefix.
        sla: Semi-Local Attention (``sla_k1`` / ``sla_k2``).
        min_full_attn_seq_len: ``min_full_attn_seq_len > 0``.
        scaling_seqlen: ``scaling_seqlen`` other than the batch ``max_seq_len``.
        dropout: attention dropout in training.
        backward: gradients of the bf16/fp16/fp32 path.
        fp8_forward_modes: ``fp8_quant_mode`` values the forward runs.
        fp8_backward_modes: ``fp8_quant_mode`` values with a backward.
        fp8_min_head_dim: the smallest head dim of the FP8 path.
        delta: delta (KV-cached) queries, high precision.
        delta_fp8_modes: FP8 modes of the delta path.
        delta_backward: gradients through the high-precision delta path.
        export: traceable by ``torch.export`` (custom ops / registered torch ops).
    """

    dtypes: FrozenSet[torch.dtype]
    devices: FrozenSet[str]
    head_dims: Optional[FrozenSet[int]] = None
    max_head_dim: int = 1 << 30
    equal_head_dims: bool = False
    non_causal: bool = True
    targets: bool = True
    contextual: bool = True
    window: bool = True
    window_with_targets_or_contextual: bool = True
    non_causal_with_targets_or_contextual: bool = True
    sla: bool = True
    min_full_attn_seq_len: bool = True
    scaling_seqlen: bool = True
    dropout: bool = False
    backward: bool = True
    fp8_forward_modes: FrozenSet[int] = frozenset()
    fp8_backward_modes: FrozenSet[int] = frozenset()
    fp8_min_head_dim: int = 1
    delta: bool = False
    delta_fp8_modes: FrozenSet[int] = frozenset()
    delta_backward: bool = False
    export: bool = True


@dataclasses.dataclass(frozen=True)
class AttentionRequest:
    """What one attention call needs (built from the call's tensors and options).

    Attributes:
        dtype: q/k/v dtype.
        device_type: ``"cpu"`` / ``"cuda"``.
        head_dim_qk: ``Dqk``.
        head_dim_v: ``Dv``.
        options: the call's :class:`AttentionOptions`.
        has_targets: ``num_targets`` is given.
        dropout: attention dropout is active.
        needs_grad: gradients will be asked for.
        delta: delta (KV-cached) queries.
        scaling_seqlen_differs: ``scaling_seqlen`` is not the batch ``max_seq_len``.
    """

    dtype: torch.dtype
    device_type: str
    head_dim_qk: int
    head_dim_v: int
    # No default instance: torch 2.11's dynamo cannot wrap a dataclass field's default object
    # and broke the compiled graph at every attention call (H200, 2026-12-02).
    options: AttentionOptions
    has_targets: bool = False
    dropout: bool = False
    needs_grad: bool = False
    delta: bool = False
    scaling_seqlen_differs: bool = False

    @classmethod
    def for_call(
        cls,
        q: torch.Tensor,
        v: torch.Tensor,
        options: AttentionOptions,
        max_seq_len: int,
        num_targets: Optional[torch.Tensor] = None,
        dropout: bool = False,
        delta: bool = False,
        k: Optional[torch.Tensor] = None,
    ) -> "AttentionRequest":
        """The request of a call with these tensors (free: shapes, dtypes and flags only)."""
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v)
        )
        return cls(
            dtype=q.dtype,
            device_type=q.device.type,
            head_dim_qk=q.shape[-1],
            head_dim_v=v.shape[-1],
            options=options,
            has_targets=num_targets is not None,
            dropout=dropout,
            needs_grad=needs_grad,
            delta=delta,
            scaling_seqlen_differs=_scaling_seqlen_differs(options.scaling_seqlen, max_seq_len),
        )


def _scaling_seqlen_differs(scaling_seqlen: int, max_seq_len: int) -> bool:
    if scaling_seqlen == -1:
        return False
    if isinstance(max_seq_len, torch.SymInt):
        # An exported max_seq_len is unknown: a fixed divisor may differ from it.
        return True
    return scaling_seqlen != max_seq_len


def missing_capability(
    caps: BackendCapabilities, request: AttentionRequest, check_device: Optional[bool] = None
) -> Optional[str]:
    """The first capability ``request`` needs that ``caps`` lacks, in words; None if it fits.

    ``check_device`` defaults to "unless tracing": an explicit kernel exports on a machine that
    cannot run it. The FP8 backward is not checked here: a forward-only FP8 result refuses its
    backward. Pure, so cached: every layer of every step asks the same few questions.
    """
    if check_device is None:
        check_device = not is_tracing()
    return _missing_capability(caps, request, check_device)


@functools.lru_cache(maxsize=1024)
def _missing_capability(caps: BackendCapabilities, request: AttentionRequest, check_device: bool) -> Optional[str]:
    opts = request.options
    if request.dtype not in caps.dtypes:
        names = sorted(str(d).replace("torch.", "") for d in caps.dtypes)
        return f"dtype {str(request.dtype).replace('torch.', '')} (supports {names})"
    if check_device and request.device_type not in caps.devices:
        return f"tensors on {request.device_type} (it needs {' or '.join(sorted(caps.devices))} tensors)"
    for name, dim in (("Dqk", request.head_dim_qk), ("Dv", request.head_dim_v)):
        if dim > caps.max_head_dim or (caps.head_dims is not None and dim not in caps.head_dims):
            allowed = sorted(caps.head_dims) if caps.head_dims is not None else f"<= {caps.max_head_dim}"
            return f"head dim {name}={dim} (supports {allowed})"
    if caps.equal_head_dims and request.head_dim_qk != request.head_dim_v:
        return (
            f"different q/k and v head dims (attention_dim {request.head_dim_qk} != "
            f"hidden_dim {request.head_dim_v})"
        )
    if not opts.causal and not caps.non_causal:
        return "causal=False"
    if request.has_targets and not caps.targets:
        return "num_targets"
    if opts.contextual_seq_len > 0 and not caps.contextual:
        return f"contextual_seq_len={opts.contextual_seq_len}"
    if opts.max_attn_len > 0 and not caps.window:
        return f"max_attn_len={opts.max_attn_len}"
    if (
        opts.max_attn_len > 0
        and (request.has_targets or opts.contextual_seq_len > 0)
        and not caps.window_with_targets_or_contextual
    ):
        return "a window (max_attn_len > 0) together with num_targets or contextual_seq_len"
    if (
        not opts.causal
        and (request.has_targets or opts.contextual_seq_len > 0)
        and not caps.non_causal_with_targets_or_contextual
    ):
        return "causal=False together with num_targets or contextual_seq_len"
    if opts.use_sla and not caps.sla:
        return f"Semi-Local Attention (sla_k1={opts.sla_k1}, sla_k2={opts.sla_k2})"
    if opts.min_full_attn_seq_len > 0 and not caps.min_full_attn_seq_len:
        return f"min_full_attn_seq_len={opts.min_full_attn_seq_len}"
    if request.scaling_seqlen_differs and not caps.scaling_seqlen:
        return f"scaling_seqlen={opts.scaling_seqlen} other than max_seq_len"
    if request.dropout and (opts.use_fp8 or not caps.dropout):
        return "attention dropout (dropout_pr > 0 in training)" + (" with FP8" if opts.use_fp8 else "")
    if opts.use_fp8 and min(request.head_dim_qk, request.head_dim_v) < caps.fp8_min_head_dim:
        return f"FP8 with head dims below {caps.fp8_min_head_dim}"
    if request.delta:
        if not opts.use_fp8 and not caps.delta:
            return "delta (KV-cached) queries"
        if opts.use_fp8 and opts.fp8_quant_mode not in caps.delta_fp8_modes:
            return f"delta (KV-cached) queries with fp8_quant_mode={opts.fp8_quant_mode}"
        if request.needs_grad and (opts.use_fp8 or not caps.delta_backward):
            return "gradients through delta (KV-cached) attention (it is for inference)"
        return None
    if opts.use_fp8:
        if opts.fp8_quant_mode not in caps.fp8_forward_modes:
            return f"fp8_quant_mode={opts.fp8_quant_mode} (FP8 modes {sorted(caps.fp8_forward_modes)})"
    elif request.needs_grad and not caps.backward:
        return "a backward pass"
    return None


@dataclasses.dataclass(frozen=True)
class Backend:
    """One row of the table.

    Attributes:
        name: the row's name (``PYTORCH``, ``TRITON``, ``CUTLASS_LEGACY``, ``CUTLASS_FORK``,
            ``CUTLASS_FBGEMM``).
        kernel: the :class:`HSTUKernel` a caller names to get it.
        capabilities: what it can do.
        is_available: whether it can run in this process (imports; not the device).
        attention: ``(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets,
            dropout_pr, training, cache) -> out``, high precision and FP8.
        delta_attention: ``(delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, alpha,
            options, num_targets, uniform_delta) -> out``, or None.
    """

    name: str
    kernel: HSTUKernel
    capabilities: BackendCapabilities
    is_available: Callable[[], bool]
    attention: Callable[..., torch.Tensor]
    delta_attention: Optional[Callable[..., torch.Tensor]] = None


# The runners import their implementation on first use (Triton and the wheels are optional);
# the implementations never import this module back.


def _pytorch_attention(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, dropout_pr, training, cache):
    if options.use_fp8:
        from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated

        return fp8_hstu_attention_emulated(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
    from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention

    return pytorch_hstu_attention(
        q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, dropout_pr, training, cache
    )


def _pytorch_delta(delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, alpha, options, num_targets, uniform_delta):
    from torchrec_hstu.ops.pytorch.delta_attention import (
        fp8_delta_hstu_attention_emulated,
        pytorch_delta_hstu_attention,
    )

    if options.use_fp8:
        return fp8_delta_hstu_attention_emulated(
            delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, alpha, options, num_targets
        )
    return pytorch_delta_hstu_attention(
        delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, alpha, options, num_targets, uniform_delta
    )


def _triton_attention(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, dropout_pr, training, cache):
    if options.use_fp8:
        from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention

        return triton_fp8_hstu_attention(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)
    from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

    return triton_hstu_attention(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)


def _triton_delta(delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, alpha, options, num_targets, uniform_delta):
    from torchrec_hstu.ops.triton.delta_attention import triton_delta_hstu_attention

    return triton_delta_hstu_attention(
        delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, alpha, options, num_targets, uniform_delta
    )


def _cutlass_attention(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, dropout_pr, training, cache):
    from torchrec_hstu.ops.cutlass import cutlass_hstu_attention

    return cutlass_hstu_attention(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets)


def _cutlass_delta(delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, alpha, options, num_targets, uniform_delta):
    from torchrec_hstu.ops.cutlass import cutlass_delta_hstu_attention

    return cutlass_delta_hstu_attention(
        delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, alpha, options, num_targets, uniform_delta
    )


def _triton_devices() -> FrozenSet[str]:
    # Triton's CPU interpreter (TRITON_INTERPRET=1, set before the process starts) runs the same
    # kernels on CPU tensors; the tests use it.
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return frozenset({"cuda", "cpu"} if interpret else {"cuda"})


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cutlass_flavor() -> Optional[str]:
    from torchrec_hstu.ops.cutlass import find_cutlass_wheel

    wheel = find_cutlass_wheel()
    return None if wheel is None else wheel.flavor


def _cutlass_is(flavor: str) -> Callable[[], bool]:
    return lambda: _cutlass_flavor() == flavor


#: The CUTLASS wheels' common limits (anchor-cutlass-fp8.md; fbgemm measured on the H200).
class _CutlassCommon(TypedDict):
    """The :class:`BackendCapabilities` fields every CUTLASS backend shares (typed for ``**``)."""

    dtypes: FrozenSet[torch.dtype]
    devices: FrozenSet[str]
    max_head_dim: int
    equal_head_dims: bool
    window_with_targets_or_contextual: bool
    non_causal_with_targets_or_contextual: bool
    min_full_attn_seq_len: bool


_CUTLASS_COMMON: _CutlassCommon = dict(
    dtypes=_HALF_FLOATS,
    devices=frozenset({"cuda"}),
    max_head_dim=256,
    equal_head_dims=True,
    window_with_targets_or_contextual=False,
    non_causal_with_targets_or_contextual=False,
    min_full_attn_seq_len=False,
)

BACKENDS: Dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "PYTORCH",
            HSTUKernel.PYTORCH,
            BackendCapabilities(
                dtypes=_ALL_FLOATS,
                devices=frozenset({"cpu", "cuda"}),
                dropout=True,
                fp8_forward_modes=_ALL_FP8_MODES,
                fp8_backward_modes=_ALL_FP8_MODES,
                delta=True,
                delta_fp8_modes=_ALL_FP8_MODES,
                delta_backward=True,
            ),
            lambda: True,
            _pytorch_attention,
            _pytorch_delta,
        ),
        Backend(
            "TRITON",
            HSTUKernel.TRITON,
            BackendCapabilities(
                dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                devices=_triton_devices(),
                max_head_dim=256,
                fp8_forward_modes=_ALL_FP8_MODES,
                fp8_backward_modes=_ALL_FP8_MODES,
                fp8_min_head_dim=16,
                delta=True,
                delta_fp8_modes=_ALL_FP8_MODES,
            ),
            _triton_importable,
            _triton_attention,
            _triton_delta,
        ),
        # NVIDIA recsys-examples' wheel (`hstu`, quant_mode, func, scaling_seqlen).
        Backend(
            "CUTLASS_LEGACY",
            HSTUKernel.CUTLASS,
            BackendCapabilities(
                **_CUTLASS_COMMON,
                fp8_forward_modes=_ALL_FP8_MODES,
                fp8_backward_modes=_ALL_FP8_MODES,
            ),
            _cutlass_is("legacy"),
            _cutlass_attention,
        ),
        # TorchEasyRec's pinned fork (`hstu`, seqused_*, required scaling_seqlen).
        Backend(
            "CUTLASS_FORK",
            HSTUKernel.CUTLASS,
            BackendCapabilities(
                **_CUTLASS_COMMON,
                fp8_forward_modes=_ALL_FP8_MODES,
                fp8_backward_modes=_ALL_FP8_MODES,
            ),
            _cutlass_is("fork"),
            _cutlass_attention,
        ),
        # FBGEMM's published wheel (`fbgemm_gpu.experimental.hstu`): no arbitrary mask (SLA),
        # scaling_seqlen by an exact rescale, FP8 forward only with per-tensor descales, and
        # delta queries (is_delta_q).
        Backend(
            "CUTLASS_FBGEMM",
            HSTUKernel.CUTLASS,
            BackendCapabilities(
                **_CUTLASS_COMMON,
                sla=False,
                fp8_forward_modes=frozenset({5}),
                delta=True,
            ),
            _cutlass_is("fbgemm"),
            _cutlass_attention,
            _cutlass_delta,
        ),
    )
}

#: The order ``AUTO`` tries (the first available one that can do the request runs).
AUTO_ORDER: Tuple[str, ...] = ("CUTLASS_LEGACY", "CUTLASS_FORK", "CUTLASS_FBGEMM", "TRITON", "PYTORCH")

_logged_auto: Set[Tuple[str, str]] = set()


def backends_for(kernel: HSTUKernel) -> Tuple[Backend, ...]:
    """The rows a kernel name covers (CUTLASS covers every CUTLASS wheel signature)."""
    return tuple(b for b in BACKENDS.values() if b.kernel == kernel)


def installed_backend(kernel: HSTUKernel) -> Optional[Backend]:
    """The available row of an explicit kernel (the importable CUTLASS wheel), or None."""
    for backend in backends_for(kernel):
        if backend.is_available():
            return backend
    return None


def kernel_capabilities(kernel: HSTUKernel) -> BackendCapabilities:
    """Capabilities of ``kernel`` as installed here; for CUTLASS without a wheel, the union a
    config may ask for (the run itself is refused later if no wheel imports)."""
    backend = installed_backend(kernel)
    if backend is not None:
        return backend.capabilities
    rows = backends_for(kernel)
    # Without a wheel the widest CUTLASS row stands for "what some CUTLASS wheel can do".
    return rows[0].capabilities


def select_backend(kernel, request: AttentionRequest) -> Backend:
    """The backend that runs ``request`` for the caller's ``kernel``.

    An explicit kernel is honoured or refused: ``ValueError`` naming the capability it lacks,
    ``RuntimeError`` when its implementation is not installed. ``AUTO`` takes the first row of
    :data:`AUTO_ORDER` that is available, runs on the request's device and can do the request,
    and logs the choice once per (request kind, backend).

    Args:
        kernel: :class:`HSTUKernel` or its name.
        request: the call (:meth:`AttentionRequest.for_call`).

    Returns:
        The :class:`Backend` to run.
    """
    kernel = to_kernel(kernel)
    backend: Optional[Backend]
    if kernel == HSTUKernel.AUTO:
        for name in AUTO_ORDER:
            backend = BACKENDS[name]
            fits = missing_capability(backend.capabilities, request, check_device=True) is None
            if fits and backend.is_available():
                key = (f"{request.device_type}/{request.dtype}/fp8={request.options.fp8_quant_mode}/"
                       f"delta={request.delta}", backend.name)
                if key not in _logged_auto:
                    _logged_auto.add(key)
                    logger.info("kernel=AUTO runs %s for %s", backend.name, key[0])
                return backend
        raise ValueError(f"kernel=AUTO: no backend can run this call ({request})")
    backend = installed_backend(kernel)
    if backend is None:
        if kernel == HSTUKernel.CUTLASS:
            from torchrec_hstu.ops.cutlass import cutlass_wheel_load_errors

            broken = "".join(f"; {name} is installed but does not load ({error})"
                             for name, error in cutlass_wheel_load_errors().items())
            raise RuntimeError(
                "kernel=CUTLASS needs a CUTLASS HSTU wheel: `hstu` (NVIDIA / TorchEasyRec "
                "fbgemm_gpu_hstu) or `fbgemm_gpu.experimental.hstu` (fbgemm-gpu-hstu-nightly), and "
                f"neither imports{broken}; use kernel=TRITON or PYTORCH"
            )
        raise RuntimeError(f"kernel={kernel.value} is not available here (Triton does not import)")
    lacking = missing_capability(backend.capabilities, request)
    if lacking is not None:
        raise ValueError(
            f"kernel={kernel.value} ({backend.name}) cannot run {lacking}; use another kernel "
            "(PYTORCH runs everything)"
        )
    return backend


def kernel_supports(
    kernel, options: AttentionOptions, head_dim_qk: int = 64, head_dim_v: int = 64, has_targets: bool = False
) -> Optional[str]:
    """What ``kernel`` lacks for these options and head dims (device and dtype aside), or None.

    Config validation asks this before any tensor exists; ``AUTO`` lacks nothing (PYTORCH runs
    everything).
    """
    kernel = to_kernel(kernel)
    if kernel == HSTUKernel.AUTO:
        return None
    caps = kernel_capabilities(kernel)
    dtype = torch.bfloat16 if torch.bfloat16 in caps.dtypes else next(iter(caps.dtypes))
    request = AttentionRequest(
        dtype=dtype,
        device_type=next(iter(sorted(caps.devices))),
        head_dim_qk=head_dim_qk,
        head_dim_v=head_dim_v,
        options=options,
        has_targets=has_targets,
    )
    return missing_capability(caps, request)


def select_kernel_for_export(kernel, request: AttentionRequest) -> HSTUKernel:
    """The kernel an exported FP8 op records: like :func:`select_backend`, but an explicit kernel
    needs only to declare the request's options, not to be installed here, nor to take this
    machine's dtype (a model exports on a machine that could not run it; on CUDA the package runs
    exactly that kernel, which checks the serving tensors, or raises)."""
    kernel = to_kernel(kernel)
    if kernel == HSTUKernel.AUTO:
        return select_backend(kernel, request).kernel
    caps = kernel_capabilities(kernel)
    if request.dtype not in caps.dtypes:
        request = dataclasses.replace(request, dtype=next(iter(sorted(caps.dtypes, key=str))))
    lacking = missing_capability(caps, request)
    if lacking is not None:
        raise ValueError(f"kernel={kernel.value} cannot run {lacking}; use another kernel")
    return kernel


@functools.lru_cache(maxsize=None)
def _describe(name: str) -> str:
    caps = BACKENDS[name].capabilities
    return ", ".join(f"{f.name}={getattr(caps, f.name)}" for f in dataclasses.fields(caps))


def describe_backends() -> Dict[str, str]:
    """``{row name: its capabilities}`` for logs and docs."""
    return {name: _describe(name) for name in BACKENDS}


def run_attention(
    backend: Backend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    options: AttentionOptions,
    num_targets: Optional[torch.Tensor] = None,
    dropout_pr: float = 0.0,
    training: bool = False,
    cache: Optional[Dict[str, Any]] = None,
) -> torch.Tensor:
    """Run full attention on ``backend`` (chosen by :func:`select_backend`).

    FP8 passes the device gate of :func:`~torchrec_hstu.ops.fp8.arch.check_fp8_support` first;
    a result whose mode has no backward on this backend or device refuses its backward
    (:class:`~torchrec_hstu.ops.fp8.arch.FP8BackwardUnsupportedError`), never a silent bf16
    backward.
    """
    if not options.use_fp8:
        return backend.attention(
            q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, dropout_pr, training, cache
        )
    mode = options.fp8_quant_mode
    backward_on_device = check_fp8_support(backend.kernel, mode, q.shape[2], v.shape[2], q.device)
    out = backend.attention(q, k, v, seq_offsets, max_seq_len, alpha, options, num_targets, 0.0, False, None)
    if not backward_on_device or mode not in backend.capabilities.fp8_backward_modes:
        out = refuse_backward(
            out,
            f"kernel={backend.kernel.value} ({backend.name}) runs fp8_quant_mode={mode} forward only "
            "here; train with kernel=TRITON / PYTORCH or fp8_quant_mode=-1",
        )
    return out


def run_delta_attention(
    backend: Backend,
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
    """Run delta attention on ``backend`` (FP8 through the same device gate as full attention)."""
    if backend.delta_attention is None:  # the table says delta=False; select_backend refused
        raise ValueError(f"{backend.name} has no delta attention")
    if options.use_fp8:
        check_fp8_support(backend.kernel, options.fp8_quant_mode, delta_q.shape[2], v.shape[2], delta_q.device)
    return backend.delta_attention(
        delta_q, k, v, seq_offsets, delta_offsets, max_seq_len, alpha, options, num_targets, uniform_delta
    )
