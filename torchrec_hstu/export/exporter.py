"""Trace a model with ``torch.export`` and compile it into one AOTInductor package.

Written once against :class:`~torchrec_hstu.export.specs.ModelSpec` (no per-kind branches);
see :mod:`torchrec_hstu.export` for the inputs, bounds and the ``max_seq_len`` choice.
"""

import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union, cast

import torch
from torch import nn

from torchrec_hstu.cli import UserError, temporary_path
from torchrec_hstu.export.signature import (
    SIZES_METADATA_KEY,
    ModelSignature,
    file_sha256,
    signature_path_for,
)
from torchrec_hstu.export.specs import ExportWrapper, ModelSpec, spec_for

if TYPE_CHECKING:
    from torchrec_hstu.models.ranking import HSTURanking
    from torchrec_hstu.models.retrieval import HSTURetrieval

logger = logging.getLogger(__name__)

__all__ = [
    "FP8_OP",
    "OP_NAMESPACE",
    "ExportResult",
    "check_export_options",
    "compile_package",
    "custom_op_modules",
    "default_inductor_configs",
    "example_inputs",
    "export_model",
    "export_program",
    "fp8_attention_nodes",
]

#: Qualified name of the opaque FP8 attention op (one node per FP8 attention call).
FP8_OP = "torchrec_hstu::hstu_fp8_fwd"
#: Namespace of this package's custom ops.
OP_NAMESPACE = "torchrec_hstu"
#: Autocast dtypes an export accepts.
AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_model` produced.

    Attributes:
        package_path: the ``.pt2`` (None when not compiled).
        signature_path: the JSON beside it (None when not compiled).
        signature: the :class:`~torchrec_hstu.export.signature.ModelSignature`.
        exported_program: the ``torch.export`` program that was compiled.
    """

    package_path: Optional[str]
    signature_path: Optional[str]
    signature: ModelSignature
    exported_program: "torch.export.ExportedProgram"


def check_export_options(device_type: str, autocast_dtype: Optional[torch.dtype]) -> None:
    """Refuse option combinations that cannot compile, before any tracing.

    A CUDA package must be traced under bf16/fp16 autocast: a float32 CUDA program fails inside
    inductor (a ``NameError`` on a size symbol in the generated code; torch 2.11, H100).

    Args:
        device_type: device the package runs on.
        autocast_dtype: mixed precision of the trace.

    Raises:
        UserError: an unsupported combination, naming the option.
    """
    if autocast_dtype not in AUTOCAST_DTYPES:
        raise UserError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16; got {autocast_dtype!r}")
    if device_type == "cuda" and autocast_dtype is None:
        raise UserError(
            "a CUDA package needs mixed precision: pass --mixed-precision bf16 (autocast_dtype=torch.bfloat16); "
            "float32 CUDA export fails inside inductor"
        )


def example_inputs(model: nn.Module, max_seq_len: int, batch_size: int = 3, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A small valid batch for ``model`` (also the export example), on its dense device.

    Args:
        model: an exportable model (see :data:`~torchrec_hstu.export.specs.SPECS`).
        max_seq_len: bound on a sequence (history, plus candidates for ranking).
        batch_size: ``B``.
        seed: RNG seed of the ids.

    Returns:
        ``{input name: tensor}`` in the order of the signature's inputs.
    """
    spec = spec_for(model)
    batch = spec.example_inputs(max_seq_len, batch_size, torch.Generator().manual_seed(seed))
    device = cast("Union[HSTURetrieval, HSTURanking]", model).dense_device()  # the kinds spec_for accepts
    return {name: batch[name].to(device) for name in spec.input_names}


def _all_nodes(program: "torch.export.ExportedProgram") -> Iterator[torch.fx.Node]:
    """Nodes of the program's graph and of its nested graphs (e.g. autocast regions)."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield from module.graph.nodes


def _custom_op_names(program: "torch.export.ExportedProgram") -> List[str]:
    """Qualified names of the ops of :data:`OP_NAMESPACE` the program calls, one per call."""
    return [
        node.target._schema.name
        for node in _all_nodes(program)
        if node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target._schema.name.startswith(OP_NAMESPACE + "::")
    ]


def fp8_attention_nodes(program: "torch.export.ExportedProgram") -> List[torch.fx.Node]:
    """The ``torchrec_hstu::hstu_fp8_fwd`` call nodes of an exported program (nested graphs
    included)."""
    return [
        node
        for node in _all_nodes(program)
        if node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target._schema.name == FP8_OP
    ]


def custom_op_modules(program: "torch.export.ExportedProgram") -> List[str]:
    """Modules to import before loading ``program``: those that registered its custom ops.

    Each op module records itself as it registers the op
    (:data:`torchrec_hstu.ops.custom_ops.OP_MODULES`, filled by ``define_attention_op``).

    Raises:
        RuntimeError: an op of this package whose module did not record itself.
    """
    from torchrec_hstu.ops.custom_ops import OP_MODULES

    modules = set()
    for qualname in sorted(set(_custom_op_names(program))):
        module = OP_MODULES.get(qualname)
        if module is None:
            raise RuntimeError(
                f"the exported program calls {qualname}, but no module recorded registering it in "
                "torchrec_hstu.ops.custom_ops.OP_MODULES (define the op with define_attention_op(..., "
                "module=__name__) or record it there)"
            )
        modules.add(module)
    return sorted(modules)


def _size_oblivious() -> Any:
    """``backed_size_oblivious``: a batch of one request (or one token) may run in a program
    traced with larger example sizes; without it torch assumes sizes >= 2 and bakes that in
    (runtime assertions ``>= 2`` in the package)."""
    import torch.fx.experimental._config as fx_config

    if not hasattr(fx_config, "backed_size_oblivious"):
        logger.warning("torch %s has no backed_size_oblivious: exported dims start at 2", torch.__version__)
        return contextlib.nullcontext()
    return fx_config.patch(backed_size_oblivious=True)  # type: ignore[attr-defined]  # installed at import by install_config_module


@contextlib.contextmanager
def _export_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, and backed sizes treated size-obliviously (see :func:`_size_oblivious`)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _size_oblivious():
            yield
    finally:
        model.train(was_training)


def _checked_bounds(spec: ModelSpec, max_batch_size: int, max_seq_len: Optional[int]) -> int:
    """``max_seq_len`` (default the spec's) after checking both bounds."""
    if max_seq_len is None:
        max_seq_len = spec.default_max_seq_len()
        if max_seq_len is None:
            raise ValueError(
                "max_seq_len must be given (the bound on a request's sequence length) for "
                f"{type(spec.model).__name__}; e.g. the config's max_seq_len"
            )
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an int >= 2; got {max_seq_len!r}")
    if not isinstance(max_batch_size, int) or max_batch_size < 2:
        raise ValueError(f"max_batch_size must be an int >= 2; got {max_batch_size!r}")
    spec.check(max_seq_len)
    return max_seq_len


def export_program(
    model: nn.Module,
    max_batch_size: int = 64,
    max_seq_len: Optional[int] = None,
    config: Optional[str] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Tuple["torch.export.ExportedProgram", ModelSignature]:
    """``torch.export.export(strict=False)`` of the whole model with dynamic dims.

    Args:
        model: an ``HSTURetrieval`` or ``HSTURanking``, on the device it will run on (the
            table too); exported in eval mode (its training flag is restored afterwards).
        max_batch_size: largest ``B`` (>= 2).
        max_seq_len: bound on a sequence (history, plus candidates for ranking); default the
            ranking encoder's ``max_seq_len`` (required for retrieval).
        config: text-format config recorded in the signature.
        autocast_dtype: mixed precision: trace the model under ``torch.autocast`` with this
            dtype (``torch.bfloat16`` / ``torch.float16``) on its device, as TorchEasyRec's
            export does for ``mixed_precision``; the casts become part of the program. The
            eager equivalent is the model called inside the same ``torch.autocast``. Required
            for CUDA packages.

    Returns:
        ``(exported program, signature)``; ``program.module()`` runs it in Python (without
        AOTInductor) on the signature's inputs. The signature's ``package_sha256`` is filled
        in by :func:`compile_package`.

    Raises:
        ValueError: bad bounds or options; TypeError: an unsupported model.
    """
    spec = spec_for(model)
    max_seq_len = _checked_bounds(spec, max_batch_size, max_seq_len)
    served = cast("Union[HSTURetrieval, HSTURanking]", model)  # the kinds spec_for accepts
    device = served.dense_device()
    check_export_options(device.type, autocast_dtype)
    if served.embedding_device() != device:
        raise ValueError(
            f"the item table is on {served.embedding_device()} and the dense part on {device}; "
            "move the whole model to the device the package will run on (model.to(device)): the "
            "table lookup is part of the exported program"
        )
    dims = spec.dims(max_batch_size, max_seq_len)
    wrapper = ExportWrapper(spec, max_seq_len, autocast_dtype)
    example = example_inputs(model, max_seq_len, batch_size=min(3, max_batch_size))
    start = time.perf_counter()
    with _export_mode(model):
        program = torch.export.export(
            wrapper, tuple(example.values()), dynamic_shapes=spec.dynamic_shapes(dims), strict=False
        )
    export_seconds = time.perf_counter() - start
    layers = spec.stu_layers()
    expected_fp8 = sum(1 for group in layers.values() for layer in group if layer.fp8_quant_mode >= 0)
    found_fp8 = len(fp8_attention_nodes(program))
    if found_fp8 != expected_fp8:
        raise RuntimeError(
            f"the exported graph holds {found_fp8} {FP8_OP} nodes but the model has {expected_fp8} FP8 "
            "attention layers; the FP8 path did not go through the opaque export op"
        )
    output = [node for node in program.graph.nodes if node.op == "output"][0].args[0][0]
    signature = ModelSignature(
        model_type=spec.model_type,
        inputs=list(spec.inputs),
        dims=dims,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        num_items=spec.table_rows(),
        output_name=spec.output_name,
        output_shape=list(spec.output_shape),
        output_dtype=str(output.meta["val"].dtype).replace("torch.", ""),
        fp8_quant_modes={name: [layer.fp8_quant_mode for layer in group] for name, group in layers.items()},
        kernels={name: [layer.kernel.value for layer in group] for name, group in layers.items()},
        device=device.type,
        autocast_dtype=None if autocast_dtype is None else str(autocast_dtype).replace("torch.", ""),
        op_modules=custom_op_modules(program),
        model_sizes=spec.model_sizes(),
        config=config,
        export_seconds=round(export_seconds, 3),
        **spec.signature_fields(),
    )
    logger.info("exported %s in %.1f s (%d FP8 attention nodes)", spec.model_type, export_seconds, found_fp8)
    return program, signature


def default_inductor_configs(device_type: str, link: bool = True) -> Dict[str, Any]:
    """The ``torch._inductor.config`` settings :func:`compile_package` starts from.

    On every device, the package's C++ library is linked through the compiler wrapper of
    :func:`torchrec_hstu.aoti_toolchain.link_configs` (``$TORCHREC_HSTU_AOTI_LINK``): with a
    toolchain that links libstdc++ statically (the H100 machine's), a package linked by inductor's
    own command crashed when loaded.

    On CUDA, compile-time autotuning is also turned off: inductor would otherwise benchmark each
    generated Triton kernel on synthetic tensors, and a kernel that gathers through a computed
    index (the embedding lookup, the jagged gathers from ``seq_offsets``) then reads a random
    index, trips its ``tl.device_assert`` bounds check and poisons the CUDA context
    (pytorch/pytorch#192143; seen here on an H100 with torch 2.11). With it off, AOTInductor
    autotunes by running the compiled graph once on the program's real example inputs.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        link: include the link configs above (:func:`compile_package` leaves them out when the
            caller chooses ``cpp.cxx``).

    Returns:
        A dict for ``inductor_configs``.
    """
    from torchrec_hstu.aoti_toolchain import link_configs

    configs = link_configs() if link else {}
    if device_type == "cuda":
        configs["triton.autotune_at_compile_time"] = False
    return configs


def compile_package(
    program: "torch.export.ExportedProgram",
    signature: ModelSignature,
    out: str,
    inductor_configs: Optional[Mapping[str, Any]] = None,
) -> Tuple[str, str]:
    """AOTInductor-compile ``program`` into ``out`` (``.pt2``) and write the signature JSON.

    Both files are written under temporary names in ``out``'s folder and renamed into place
    only when both are complete (the ``.json`` first, then the ``.pt2``): an interrupted export
    leaves the previous pair (or none) and at worst a new ``.json`` whose digest refuses the old
    ``.pt2``, never a silently mismatched pair. The package's metadata holds the model sizes
    (:data:`~torchrec_hstu.export.signature.SIZES_METADATA_KEY`); the signature holds the
    package's sha256.

    Args:
        program: from :func:`export_program`.
        signature: from :func:`export_program` (``compile_seconds`` and ``package_sha256`` are
            filled in).
        out: package path ending in ``.pt2``.
        inductor_configs: extra ``torch._inductor.config`` settings for the compile, e.g.
            ``{"aot_inductor.debug_compile": True}`` (C++ at -O0: faster to build, slower to run);
            they override :func:`default_inductor_configs` for the signature's device.

    Returns:
        ``(package path, signature path)``.
    """
    if not out.endswith(".pt2"):
        raise ValueError(f"out must be a path ending in .pt2; got {out!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sizes = {**signature.model_sizes, "max_seq_len": signature.max_seq_len, "max_batch_size": signature.max_batch_size}
    configs = {
        **default_inductor_configs(signature.device, link="cpp.cxx" not in (inductor_configs or {})),
        "aot_inductor.metadata": {SIZES_METADATA_KEY: json.dumps(sizes, sort_keys=True)},
        **(inductor_configs or {}),
    }
    signature_path = signature_path_for(out)
    package_tmp = temporary_path(out, ".tmp.pt2")
    signature_tmp = temporary_path(signature_path, ".tmp.json")
    try:
        start = time.perf_counter()
        with _size_oblivious():
            torch._inductor.aoti_compile_and_package(program, package_path=package_tmp, inductor_configs=configs)
        signature.compile_seconds = round(time.perf_counter() - start, 3)
        signature.package_sha256 = file_sha256(package_tmp)
        signature.save(signature_tmp)
        os.replace(signature_tmp, signature_path)
        os.replace(package_tmp, out)
    finally:
        for leftover in (package_tmp, signature_tmp):
            if os.path.exists(leftover):
                os.remove(leftover)
    logger.info("compiled %s in %.1f s; signature %s", out, signature.compile_seconds, signature_path)
    return out, signature_path


def export_model(
    model: nn.Module,
    out: Optional[str],
    max_batch_size: int = 64,
    max_seq_len: Optional[int] = None,
    config: Optional[str] = None,
    inductor_configs: Optional[Mapping[str, Any]] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> ExportResult:
    """Export ``model`` and compile it into one AOTInductor package with its signature JSON.

    Args:
        model: an ``HSTURetrieval`` or ``HSTURanking`` on the device the package will run on.
        out: ``.pt2`` path (the signature goes to the same name with ``.json``); ``None``
            skips the compile (the result then only holds the exported program).
        max_batch_size: largest ``B``.
        max_seq_len: bound on a sequence; see :func:`export_program`.
        config: text-format config recorded in the signature.
        inductor_configs: see :func:`compile_package`.
        autocast_dtype: mixed precision; see :func:`export_program`.

    Returns:
        :class:`ExportResult`.
    """
    program, signature = export_program(model, max_batch_size, max_seq_len, config, autocast_dtype)
    if out is None:
        return ExportResult(None, None, signature, program)
    package_path, signature_path = compile_package(program, signature, out, inductor_configs)
    return ExportResult(package_path, signature_path, signature, program)
