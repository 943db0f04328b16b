"""One factory for the attention custom ops, and the :class:`AttentionOptions` codec they share.

Every attention op (the Triton families' forward / backward, the FP8 export op) takes the same
arguments: leading tensors (``q, k, v, seq_offsets, num_targets``, and ``dout`` first for a
backward), ``max_seq_len``, ``alpha``, the :class:`AttentionOptions` fields in declaration
order, then op-specific trailing arguments. :func:`define_attention_op` writes that schema once
from the dataclass, registers the implementations and the fake, and hands each implementation
an :class:`AttentionOptions` again (:meth:`AttentionOptions.to_op_args` /
:meth:`AttentionOptions.from_op_args` are the codec), so no op spells the eight fields out.

An eager call of a differentiable op (:func:`register_attention_autograd`) on plain tensors runs
the same implementations through a :class:`torch.autograd.Function` instead of the dispatcher:
the custom-op autograd wrapper re-binds the ~20-argument schema on every call, which measured
0.2 ms of host time per forward+backward on the GPU machine (more than the GPU's work at
N=1024). Under torch.compile / torch.export / fx tracing, a dispatch mode (fake tensors,
make_fx), torch-function modes, functorch transforms or tensor subclasses, the op is called, so
graphs record it as before (:func:`eager_call_skips_dispatcher`).
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from torchrec_hstu.ops.common import AttentionOptions, is_tracing

#: Schema types of the :class:`AttentionOptions` fields, in declaration order.
_SCHEMA_TYPES = {bool: "bool", int: "int", "bool": "bool", "int": "int"}
OPTION_SCHEMA: str = ", ".join(
    f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(AttentionOptions)
)
NUM_OPTION_ARGS = len(dataclasses.fields(AttentionOptions))

#: Leading tensor arguments of every attention forward op (a backward op takes ``dout`` first).
ATTENTION_TENSORS = ("Tensor q", "Tensor k", "Tensor v", "Tensor seq_offsets", "Tensor? num_targets")


def attention_output_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: Any) -> torch.Tensor:
    """The fake of every attention forward op: ``[L, H, Dv]`` in the dtype of ``v``."""
    return v.new_empty((q.shape[0], q.shape[1], v.shape[2]))


#: Python modules that define custom ops, recorded as they register (an exported program needs
#: them imported before it loads).
OP_MODULES: Dict[str, str] = {}


def define_attention_op(
    qualname: str,
    tensors: Sequence[str],
    impl: Callable[..., Any],
    fake: Callable[..., Any],
    trailing: Sequence[str] = (),
    returns: str = "Tensor",
    cuda_impl: Optional[Callable[..., Any]] = None,
    module: Optional[str] = None,
) -> Callable[..., Any]:
    """Define ``qualname`` with the shared attention signature and return a caller.

    Args:
        qualname: ``"namespace::name"``.
        tensors: schema of the leading tensor arguments (``"Tensor q"``, ``"Tensor? num_targets"``).
        impl: ``impl(*tensors, max_seq_len, alpha, options, *trailing)``: the default (CPU and
            any device without its own) implementation.
        fake: same signature; returns empty outputs of the right shapes.
        trailing: schema of op-specific trailing arguments (``"str kernel"``).
        returns: the schema's return type.
        cuda_impl: the CUDA implementation, if it differs from ``impl``.
        module: the Python module that must be imported for the op to exist (recorded in
            :data:`OP_MODULES`).

    Returns:
        ``call(*tensors, max_seq_len, alpha, options, *trailing)``: runs the op.
    """
    namespace, name = qualname.split("::")
    schema = (
        f"({', '.join(tensors)}, SymInt max_seq_len, float alpha, {OPTION_SCHEMA}"
        f"{''.join(', ' + t for t in trailing)}) -> {returns}"
    )
    torch.library.define(qualname, schema)
    num_tensors = len(tensors)

    def decoded(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            head = args[: num_tensors + 2]
            options = AttentionOptions.from_op_args(args[num_tensors + 2 : num_tensors + 2 + NUM_OPTION_ARGS])
            return fn(*head, options, *args[num_tensors + 2 + NUM_OPTION_ARGS :])

        return run

    torch.library.impl(qualname, "default")(decoded(impl))
    if cuda_impl is not None:
        torch.library.impl(qualname, "cuda")(decoded(cuda_impl))
    torch.library.register_fake(qualname)(decoded(fake))
    if module is not None:
        OP_MODULES[qualname] = module
    op = getattr(getattr(torch.ops, namespace), name)

    def call(*args: Any) -> Any:
        head = args[: num_tensors + 2]
        options: AttentionOptions = args[num_tensors + 2]
        return op(*head, *options.to_op_args(), *args[num_tensors + 3 :])

    call.op = op  # type: ignore[attr-defined]
    call.qualname = qualname  # type: ignore[attr-defined]
    call.impl = impl  # type: ignore[attr-defined]
    call.cuda_impl = cuda_impl  # type: ignore[attr-defined]
    return call


def eager_call_skips_dispatcher(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """True when an attention op called on ``tensors`` may run its implementation directly:
    plain eager execution, where the dispatcher would only add host time.

    False under torch.compile / torch.export / fx symbolic tracing, with a torch dispatch mode
    (fake tensors, make_fx, debug modes) or torch-function mode active, under functorch
    transforms, or when any tensor is a subclass (the op must then be seen or dispatched).
    """
    if is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)


def register_attention_autograd(
    fwd: Callable[..., Any],
    bwd: Callable[..., Any],
    eager_forward: Optional[Callable[..., Tuple[torch.Tensor, Any]]] = None,
    eager_backward: Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None,
) -> Callable[..., Any]:
    """Autograd of a forward op ``(q, k, v, seq_offsets, num_targets, ...)`` by its backward op
    ``(dout, q, k, v, seq_offsets, num_targets, ...) -> (dq, dk, dv)`` (both from
    :func:`define_attention_op`); everything after the tensors gets no gradient.

    Args:
        fwd: the forward op's caller.
        bwd: the backward op's caller.
        eager_forward: optional ``(*fwd_args) -> (out, residual)`` for eager calls: the
            forward implementation that also returns what its backward can reuse (the op
            path, which saves only the inputs, recomputes it). The residual is held on the
            autograd context until the backward, outside saved-tensor hooks (offloading hooks
            do not move it).
        eager_backward: with ``eager_forward``: ``(dout, *fwd_args, residual) -> (dq, dk, dv)``,
            equal to the backward implementation.

    Returns:
        ``call(*args)`` with the forward op's arguments: the same autograd through a
        :class:`torch.autograd.Function` over the implementations when
        :func:`eager_call_skips_dispatcher` allows it, else the forward op.
    """
    if fwd.cuda_impl is not None or bwd.cuda_impl is not None:  # type: ignore[attr-defined]
        raise ValueError("register_attention_autograd: the eager path needs one implementation per op")
    if (eager_forward is None) != (eager_backward is None):
        raise ValueError("register_attention_autograd: eager_forward and eager_backward go together")
    fwd_impl, bwd_impl = fwd.impl, bwd.impl  # type: ignore[attr-defined]

    def forward_without_residual(*args: Any) -> Tuple[torch.Tensor, Any]:
        return fwd_impl(*args), None

    def backward_without_residual(dout: torch.Tensor, *args: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return bwd_impl(dout, *args[:-1])

    forward_with_residual = eager_forward or forward_without_residual
    backward_with_residual = eager_backward or backward_without_residual

    class EagerAttention(torch.autograd.Function):
        """The op's autograd (below) without the dispatcher, for plain eager calls."""

        @staticmethod
        def forward(ctx: Any, *args: Any) -> torch.Tensor:  # type: ignore[override]
            ctx.save_for_backward(*args[:5])
            ctx.rest = args[5:]
            out, ctx.residual = forward_with_residual(*args)
            return out

        @staticmethod
        def backward(ctx: Any, *grads: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
            dq, dk, dv = backward_with_residual(grads[0], *ctx.saved_tensors, *ctx.rest, ctx.residual)
            return (dq, dk, dv) + (None,) * (2 + len(ctx.rest))

    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs[:5])
        ctx.rest = inputs[5:]

    def backward(ctx: Any, dout: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        dq, dk, dv = bwd.op(dout, *ctx.saved_tensors, *ctx.rest)  # type: ignore[attr-defined]
        return (dq, dk, dv) + (None,) * (2 + len(ctx.rest))

    torch.library.register_autograd(fwd.qualname, backward, setup_context=setup_context)  # type: ignore[attr-defined]

    def call(*args: Any) -> torch.Tensor:
        if eager_call_skips_dispatcher(args[:5]):
            return EagerAttention.apply(*args)
        return fwd(*args)

    call.op = fwd.op  # type: ignore[attr-defined]
    call.qualname = fwd.qualname  # type: ignore[attr-defined]
    call.eager_function = EagerAttention  # type: ignore[attr-defined]
    return call
