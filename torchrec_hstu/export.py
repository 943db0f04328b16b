"""Export a model to one AOTInductor package (``.pt2``) with a JSON input signature beside it.

The exported program is the whole model from ids to scores: the torchrec
``EmbeddingCollection`` lookup, the HSTU transducer(s) and the head. It is traced with
``torch.export.export(..., strict=False)`` with dynamic dims and compiled with
``torch._inductor.aoti_compile_and_package``; :mod:`torchrec_hstu.predict` loads it with
``torch._inductor.aoti_load_package``.

Supported models and their flat inputs (all int64, 1-D; symbols ``B`` requests, ``K``
channels, ``L`` / ``Lh`` history tokens, ``T`` candidates):

* :class:`~torchrec_hstu.models.retrieval.HSTURetrieval` -> ``scores [B, num_items]``:
  ``item_ids [L]``, ``lengths [B]``, ``timestamps [L]`` (every length >= 1).
* :class:`~torchrec_hstu.models.ranking.HSTURanking` -> ``logits [T, num_tasks]``:
  ``history_ids [Lh]``, ``history_lengths [K * B]`` (channel-major), ``history_timestamps [Lh]``,
  ``history_actions [Lh]``, ``candidate_ids [T]``, ``num_targets [B]``, ``candidate_timestamps [T]``.

Dynamic dims and bounds: ``1 <= B <= max_batch_size``; token counts between 0 (1 for retrieval
and candidates) and ``max_batch_size * max_seq_len`` (``K *`` that for ``Lh``); a sequence
(history, plus the candidates for ranking) has at most ``max_seq_len`` tokens.

``max_seq_len`` inside the program: the batch's exact maximum, read from the lengths as a
data-dependent (unbacked) size and checked against the bound by a runtime assertion. So the
PyTorch reference kernel pads to the batch maximum (not to the bound), and
``scaling_seqlen = -1`` divides by the same value as eager: predictions equal eager
``model.eval()`` outputs for any batch within the bounds. (A static bound would pad every
batch to ``max_seq_len`` and change ``scaling_seqlen = -1`` outputs; a traced input dim would
make the caller pass a consistent size.)

FP8: every STU layer with ``fp8_quant_mode`` in 0..5 becomes one
``torchrec_hstu::hstu_fp8_fwd`` node (the dispatcher emits it under
``torch.compiler.is_exporting()``); the package runs it on CPU through the exact emulation
and on CUDA through CUTLASS / Triton. Loading such a package needs the op library imported
(the signature lists the modules; :mod:`torchrec_hstu.predict` imports them).

Example::

    >>> from torchrec_hstu.models.ranking import HSTURanking
    >>> model = HSTURanking(num_items=30, item_embedding_dim=8, channels=("clicks",),
    ...     embedding_dim=16, num_layers=1, num_heads=1, attention_dim=8, hidden_dim=8,
    ...     max_seq_len=16)
    >>> result = export_model(model, "/tmp/ranking.pt2", max_batch_size=8)  # doctest: +SKIP
    >>> result.signature.input_names  # doctest: +SKIP
    ['history_ids', 'history_lengths', ...]

CLI::

    python -m torchrec_hstu.export --config X.pbtxt --checkpoint ckpt.pt --out model.pt2
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "SIGNATURE_VERSION",
    "ExportResult",
    "InputSpec",
    "ModelSignature",
    "autocast_context",
    "build_model_from_config",
    "compile_package",
    "default_inductor_configs",
    "export_model",
    "export_program",
    "example_inputs",
    "fp8_attention_nodes",
    "load_checkpoint_state",
    "main",
    "signature_path_for",
]

#: Version of the package format: the signature JSON layout and the op schemas the program calls
#: (2: ``torchrec_hstu::hstu_fp8_fwd`` records the exported kernel). Older packages are refused
#: with a "re-export" message.
SIGNATURE_VERSION = 2
#: Kinds of models this module exports.
RETRIEVAL = "retrieval"
RANKING = "ranking"
#: Qualified name of the opaque FP8 attention op (one node per FP8 attention call).
FP8_OP = "torchrec_hstu::hstu_fp8_fwd"
#: Modules that register our custom ops, for ops whose defining module cannot be looked up.
_KNOWN_OP_MODULES = {
    "torchrec_hstu::hstu_fp8_fwd": "torchrec_hstu.ops.fp8.export_op",
    "torchrec_hstu::triton_hstu_attention_fwd": "torchrec_hstu.ops.triton.hstu_attention",
    "torchrec_hstu::triton_hstu_attention_bwd": "torchrec_hstu.ops.triton.hstu_attention",
    "torchrec_hstu::triton_hstu_fp8_attention_fwd": "torchrec_hstu.ops.triton.fp8_attention",
    "torchrec_hstu::triton_hstu_fp8_attention_bwd": "torchrec_hstu.ops.triton.fp8_attention",
}


# -- signature ---------------------------------------------------------------------------


@dataclasses.dataclass
class InputSpec:
    """One flat input of the exported program.

    Attributes:
        name: argument name (the model's ``forward`` argument).
        dtype: ``"int64"``.
        shape: one symbol per dim (e.g. ``["L"]``, ``["K*B"]``), keys of
            :attr:`ModelSignature.dims` or ``"K*B"``.
        description: what it holds.
    """

    name: str
    dtype: str
    shape: List[str]
    description: str = ""


@dataclasses.dataclass
class ModelSignature:
    """What a package takes and returns; written as JSON beside the ``.pt2``.

    Attributes:
        model_type: ``"retrieval"`` or ``"ranking"``.
        inputs: the program's positional inputs, in order.
        dims: ``{symbol: [min, max]}`` bounds of the dynamic dims.
        max_batch_size: largest ``B``.
        max_seq_len: longest sequence (history, plus candidates for ranking) per channel.
        num_items: item table rows (ids must be in ``[0, num_items)``).
        output_name: ``"scores"`` (retrieval) or ``"logits"`` (ranking).
        output_shape: symbols of the output dims (``["B", "num_items"]`` / ``["T", "num_tasks"]``).
        output_dtype: e.g. ``"float32"``.
        channels: history channel names (ranking; ``[]`` for retrieval).
        task_names: one per output column (ranking).
        fp8_quant_modes: per channel (``"transducer"`` for retrieval) the mode of each layer.
        kernels: per channel the attention kernel of each layer.
        device: device the package runs on (``"cpu"`` / ``"cuda"``).
        autocast_dtype: mixed precision the program was traced with (``"bfloat16"``,
            ``"float16"`` or None).
        op_modules: Python modules that register the custom ops the program calls; import
            them before loading.
        config: the text-format config the model was built from (``None`` if not from one).
        torch_version: torch version that exported it.
        export_seconds: time of ``torch.export``; ``compile_seconds``: of AOTInductor.
    """

    model_type: str
    inputs: List[InputSpec]
    dims: Dict[str, List[int]]
    max_batch_size: int
    max_seq_len: int
    num_items: int
    output_name: str
    output_shape: List[str]
    output_dtype: str = "float32"
    channels: List[str] = dataclasses.field(default_factory=list)
    task_names: List[str] = dataclasses.field(default_factory=list)
    fp8_quant_modes: Dict[str, List[int]] = dataclasses.field(default_factory=dict)
    kernels: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    device: str = "cpu"
    autocast_dtype: Optional[str] = None
    op_modules: List[str] = dataclasses.field(default_factory=list)
    config: Optional[str] = None
    torch_version: str = torch.__version__
    export_seconds: float = 0.0
    compile_seconds: float = 0.0
    version: int = SIGNATURE_VERSION

    @property
    def input_names(self) -> List[str]:
        return [spec.name for spec in self.inputs]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> "ModelSignature":
        """Inverse of :meth:`to_dict`; ``ValueError`` for an unknown layout version."""
        if payload.get("version") != SIGNATURE_VERSION:
            raise ValueError(
                f"signature version must be {SIGNATURE_VERSION}; got {payload.get('version')!r} "
                "(re-export the model with this version of torchrec_hstu.export)"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in payload.items() if k in fields}
        values["inputs"] = [InputSpec(**spec) for spec in payload["inputs"]]
        return cls(**values)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")

    @classmethod
    def load(cls, path: str) -> "ModelSignature":
        """Read a signature JSON; ``FileNotFoundError`` / ``ValueError`` name the file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"signature file not found: {path} (torchrec_hstu.export writes it beside the .pt2)"
            )
        with open(path, "r", encoding="utf-8") as handle:
            try:
                payload = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from err
        try:
            return cls.from_dict(payload)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a torchrec_hstu export signature ({err})") from err


def signature_path_for(package_path: str) -> str:
    """``model.pt2`` -> ``model.json`` (the signature beside the package)."""
    root, _ = os.path.splitext(package_path)
    return root + ".json"


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_model` produced.

    Attributes:
        package_path: the ``.pt2`` (None when ``aoti=False``).
        signature_path: the JSON beside it (None when ``aoti=False``).
        signature: the :class:`ModelSignature`.
        exported_program: the ``torch.export`` program that was compiled.
    """

    package_path: Optional[str]
    signature_path: Optional[str]
    signature: ModelSignature
    exported_program: "torch.export.ExportedProgram"


# -- wrappers: flat tensors in, the model's output out -------------------------------------


def _longest(lengths: torch.Tensor, bound: int) -> Any:
    """The largest of ``lengths`` (at least 1) as a size; checked ``<= bound`` when traced.

    In eager mode a Python int; under ``torch.export`` an unbacked ``SymInt`` with the bound as
    a runtime assertion (no guard, no specialization).
    """
    longest = torch.cat([lengths, lengths.new_ones(1)]).max().item()
    torch._check(longest >= 1)
    torch._check(longest <= bound)
    return longest


def autocast_context(device_type: str, dtype: Optional[torch.dtype]) -> Any:
    """``torch.autocast(device_type, dtype)``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


class RetrievalExportModule(nn.Module):
    """``HSTURetrieval`` with ``max_seq_len`` computed from the lengths inside the program.

    Args:
        model: the retrieval model (eval mode).
        max_seq_len: bound on a sequence's length.
        autocast_dtype: run the model under ``torch.autocast`` with this dtype (None: off).
    """

    def __init__(self, model: nn.Module, max_seq_len: int, autocast_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.autocast_dtype = autocast_dtype
        self.device_type = _model_device(model).type

    def forward(self, item_ids: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """``item_ids [L]``, ``lengths [B]``, ``timestamps [L]`` -> ``scores [B, num_items]``."""
        with autocast_context(self.device_type, self.autocast_dtype):
            return self.model(item_ids, lengths, timestamps, _longest(lengths, self.max_seq_len))


class RankingExportModule(nn.Module):
    """``HSTURanking`` with the bound on ``history + candidates`` asserted inside the program.

    The multi-channel encoder reads each channel's exact maximum from the lengths itself.

    Args:
        model: the ranking model (eval mode).
        max_seq_len: bound on a channel's ``history + candidates`` per request.
        autocast_dtype: run the model under ``torch.autocast`` with this dtype (None: off).
    """

    def __init__(self, model: nn.Module, max_seq_len: int, autocast_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.num_channels = len(model.channels)
        self.autocast_dtype = autocast_dtype
        self.device_type = _model_device(model).type

    def forward(
        self,
        history_ids: torch.Tensor,
        history_lengths: torch.Tensor,
        history_timestamps: torch.Tensor,
        history_actions: torch.Tensor,
        candidate_ids: torch.Tensor,
        num_targets: torch.Tensor,
        candidate_timestamps: torch.Tensor,
    ) -> torch.Tensor:
        """Flat ranking inputs (see the module docstring) -> ``logits [T, num_tasks]``."""
        per_channel = history_lengths.view(self.num_channels, -1) + num_targets.unsqueeze(0)
        _longest(per_channel.flatten(), self.max_seq_len)
        with autocast_context(self.device_type, self.autocast_dtype):
            return self.model(
                history_ids,
                history_lengths,
                history_timestamps,
                history_actions,
                candidate_ids,
                num_targets,
                candidate_timestamps,
            )


def _model_type(model: nn.Module) -> str:
    from torchrec_hstu.models.ranking import HSTURanking
    from torchrec_hstu.models.retrieval import HSTURetrieval

    if isinstance(model, HSTURetrieval):
        return RETRIEVAL
    if isinstance(model, HSTURanking):
        return RANKING
    raise TypeError(
        "export supports torchrec_hstu.models.retrieval.HSTURetrieval and "
        f"torchrec_hstu.models.ranking.HSTURanking; got {type(model).__name__}"
    )


def _input_specs(model_type: str) -> List[InputSpec]:
    if model_type == RETRIEVAL:
        return [
            InputSpec("item_ids", "int64", ["L"], "history item ids, sequences back to back (oldest first)"),
            InputSpec("lengths", "int64", ["B"], "history length of each request (>= 1)"),
            InputSpec("timestamps", "int64", ["L"], "seconds, one per history item"),
        ]
    return [
        InputSpec("history_ids", "int64", ["Lh"], "history item ids, channel-major, requests back to back"),
        InputSpec("history_lengths", "int64", ["K*B"], "history length per (channel, request), channel-major"),
        InputSpec("history_timestamps", "int64", ["Lh"], "seconds, one per history item"),
        InputSpec("history_actions", "int64", ["Lh"], "action bitmask per history item (>= 0)"),
        InputSpec("candidate_ids", "int64", ["T"], "candidate item ids, requests back to back"),
        InputSpec("num_targets", "int64", ["B"], "candidates per request"),
        InputSpec("candidate_timestamps", "int64", ["T"], "seconds (request time), one per candidate"),
    ]


def _dims(model_type: str, max_batch_size: int, max_seq_len: int, num_channels: int) -> Dict[str, List[int]]:
    tokens = max_batch_size * max_seq_len
    if model_type == RETRIEVAL:
        return {"B": [1, max_batch_size], "L": [1, tokens]}
    return {"B": [1, max_batch_size], "Lh": [0, num_channels * tokens], "T": [1, tokens]}


def _dynamic_shapes(model_type: str, dims: Mapping[str, List[int]], num_channels: int) -> Tuple[Dict[int, Any], ...]:
    from torch.export import Dim

    sym = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in dims.items()}
    if model_type == RETRIEVAL:
        return ({0: sym["L"]}, {0: sym["B"]}, {0: sym["L"]})
    histories = {0: sym["Lh"]}
    return (
        histories,
        {0: num_channels * sym["B"]},
        dict(histories),
        dict(histories),
        {0: sym["T"]},
        {0: sym["B"]},
        {0: sym["T"]},
    )


def _table_rows(model: nn.Module) -> int:
    return int(model.embedding_collection.embeddings[model.table_name].weight.shape[0])


def _model_device(model: nn.Module) -> torch.device:
    return model.dense_device()


def example_inputs(
    model: nn.Module, max_seq_len: int, batch_size: int = 3, seed: int = 0
) -> Dict[str, torch.Tensor]:
    """A small valid batch for ``model`` (also the export example), on its dense device.

    Args:
        model: an ``HSTURetrieval`` or ``HSTURanking``.
        max_seq_len: bound on a sequence (history, plus candidates for ranking).
        batch_size: ``B``.
        seed: RNG seed of the ids.

    Returns:
        ``{input name: tensor}`` in the order of the signature's inputs.
    """
    model_type = _model_type(model)
    device = _model_device(model)
    generator = torch.Generator().manual_seed(seed)
    num_items = _table_rows(model)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, num_items, (n,), generator=generator)

    def stamps(lengths: List[int]) -> torch.Tensor:
        parts = [torch.sort(torch.randint(0, 10_000_000, (n,), generator=generator)).values for n in lengths]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    if model_type == RETRIEVAL:
        lengths = [max(1, min(max_seq_len, 2 + b)) for b in range(batch_size)]
        batch = {"item_ids": ids(sum(lengths)), "lengths": torch.tensor(lengths), "timestamps": stamps(lengths)}
    else:
        num_channels = len(model.channels)
        targets = [1 + b % 2 for b in range(batch_size)]
        history = [
            max(0, min(max_seq_len - targets[b], 2 + b + c)) for c in range(num_channels) for b in range(batch_size)
        ]
        total_targets = sum(targets)
        batch = {
            "history_ids": ids(sum(history)),
            "history_lengths": torch.tensor(history),
            "history_timestamps": stamps(history),
            "history_actions": torch.randint(0, 4, (sum(history),), generator=generator),
            "candidate_ids": ids(total_targets),
            "num_targets": torch.tensor(targets),
            "candidate_timestamps": torch.full((total_targets,), 10_000_001, dtype=torch.int64),
        }
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _stu_layers(model: nn.Module, model_type: str) -> Dict[str, List[nn.Module]]:
    if model_type == RETRIEVAL:
        return {"transducer": list(model.transducer.stu_module.layers)}
    return {name: list(model.encoder.channel(name).stu_module.layers) for name in model.channels}


def _all_nodes(program: "torch.export.ExportedProgram") -> Iterator[torch.fx.Node]:
    """Nodes of the program's graph and of its nested graphs (e.g. autocast regions)."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield from module.graph.nodes


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


def _custom_op_modules(program: "torch.export.ExportedProgram") -> List[str]:
    """Modules that register the non-aten ops of ``program`` in our namespace."""
    names = set()
    for node in _all_nodes(program):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        qualname = node.target._schema.name
        if qualname.startswith("torchrec_hstu::"):
            names.add(qualname)
    modules = set()
    for qualname in sorted(names):
        module = _KNOWN_OP_MODULES.get(qualname)
        if module is None:
            try:
                from torch._library.custom_ops import OPDEFS

                module = OPDEFS[qualname]._init_fn.__module__
            except (ImportError, KeyError, AttributeError):
                raise RuntimeError(
                    f"exported program calls {qualname}, whose defining module is unknown; add it to "
                    "torchrec_hstu.export._KNOWN_OP_MODULES"
                ) from None
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
    return fx_config.patch(backed_size_oblivious=True)


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


def _default_max_seq_len(model: nn.Module, model_type: str) -> Optional[int]:
    if model_type == RANKING and model.encoder.max_seq_len > 0:
        return int(model.encoder.max_seq_len)
    return None


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
            eager equivalent is the model called inside the same ``torch.autocast``.

    Returns:
        ``(exported program, signature)``; ``program.module()`` runs it in Python (without
        AOTInductor) on the signature's inputs.

    Raises:
        ValueError: bad bounds; TypeError: an unsupported model.
    """
    model_type = _model_type(model)
    if max_seq_len is None:
        max_seq_len = _default_max_seq_len(model, model_type)
        if max_seq_len is None:
            raise ValueError(
                "max_seq_len must be given (the bound on a request's sequence length) for "
                f"{type(model).__name__}; e.g. the config's max_seq_len"
            )
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an int >= 2; got {max_seq_len!r}")
    if not isinstance(max_batch_size, int) or max_batch_size < 2:
        raise ValueError(f"max_batch_size must be an int >= 2; got {max_batch_size!r}")
    if model_type == RANKING and 0 < model.encoder.max_seq_len < max_seq_len:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the ranking encoder's max_seq_len="
            f"{model.encoder.max_seq_len}; export with a bound <= the model's"
        )
    if model.embedding_device() != _model_device(model):
        raise ValueError(
            f"the item table is on {model.embedding_device()} and the dense part on {_model_device(model)}; "
            "move the whole model to the device the package will run on (model.to(device)): the "
            "table lookup is part of the exported program"
        )
    num_channels = len(model.channels) if model_type == RANKING else 1
    dims = _dims(model_type, max_batch_size, max_seq_len, num_channels)
    if autocast_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16; got {autocast_dtype!r}")
    wrapper_cls = RetrievalExportModule if model_type == RETRIEVAL else RankingExportModule
    wrapper: nn.Module = wrapper_cls(model, max_seq_len, autocast_dtype)
    example = example_inputs(model, max_seq_len, batch_size=min(3, max_batch_size))
    start = time.perf_counter()
    with _export_mode(model):
        program = torch.export.export(
            wrapper,
            tuple(example.values()),
            dynamic_shapes=_dynamic_shapes(model_type, dims, num_channels),
            strict=False,
        )
    export_seconds = time.perf_counter() - start
    layers = _stu_layers(model, model_type)
    expected_fp8 = sum(1 for group in layers.values() for layer in group if layer.fp8_quant_mode >= 0)
    found_fp8 = len(fp8_attention_nodes(program))
    if found_fp8 != expected_fp8:
        raise RuntimeError(
            f"the exported graph holds {found_fp8} {FP8_OP} nodes but the model has {expected_fp8} FP8 "
            "attention layers; the FP8 path did not go through the opaque export op"
        )
    output = [node for node in program.graph.nodes if node.op == "output"][0].args[0][0]
    output_dtype = str(output.meta["val"].dtype).replace("torch.", "")
    signature = ModelSignature(
        model_type=model_type,
        inputs=_input_specs(model_type),
        dims=dims,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        num_items=_table_rows(model),
        output_name="scores" if model_type == RETRIEVAL else "logits",
        output_shape=["B", "num_items"] if model_type == RETRIEVAL else ["T", "num_tasks"],
        output_dtype=output_dtype,
        channels=list(model.channels) if model_type == RANKING else [],
        task_names=list(model.task_names) if model_type == RANKING else [],
        fp8_quant_modes={name: [layer.fp8_quant_mode for layer in group] for name, group in layers.items()},
        kernels={name: [layer.kernel.value for layer in group] for name, group in layers.items()},
        device=_model_device(model).type,
        autocast_dtype=None if autocast_dtype is None else str(autocast_dtype).replace("torch.", ""),
        op_modules=_custom_op_modules(program),
        config=config,
        export_seconds=round(export_seconds, 3),
    )
    logger.info("exported %s in %.1f s (%d FP8 attention nodes)", model_type, export_seconds, found_fp8)
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

    Args:
        program: from :func:`export_program`.
        signature: from :func:`export_program` (its ``compile_seconds`` is filled in).
        out: package path ending in ``.pt2``.
        inductor_configs: extra ``torch._inductor.config`` settings for the compile, e.g.
            ``{"aot_inductor.debug_compile": True}`` (C++ at -O0: faster to build, slower to run);
            they override :func:`default_inductor_configs` for the signature's device.

    Returns:
        ``(package path, signature path)``.
    """
    if not out.endswith(".pt2"):
        raise ValueError(f"out must be a path ending in .pt2; got {out!r}")
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    start = time.perf_counter()
    with _size_oblivious():
        path = torch._inductor.aoti_compile_and_package(
            program,
            package_path=out,
            inductor_configs={
                **default_inductor_configs(signature.device, link="cpp.cxx" not in (inductor_configs or {})),
                **(inductor_configs or {}),
            },
        )
    signature.compile_seconds = round(time.perf_counter() - start, 3)
    signature_path = signature_path_for(path)
    signature.save(signature_path)
    logger.info("compiled %s in %.1f s; signature %s", path, signature.compile_seconds, signature_path)
    return path, signature_path


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


# -- models from a config and a checkpoint -------------------------------------------------


def load_checkpoint_state(path: str) -> Dict[str, torch.Tensor]:
    """The model ``state_dict`` in a checkpoint (``torch.load(weights_only=True)``).

    Accepts a bare state dict or a training checkpoint ``{"model": state_dict, ...}``; strips a
    ``module.`` (DDP/DMP) or ``model.`` (training wrapper) prefix shared by every key.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict or a checkpoint with a 'model' state dict")
    state = dict(state)
    for prefix in ("module.", "model."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _find_table(state: Mapping[str, torch.Tensor]) -> Tuple[str, torch.Tensor]:
    prefix = "embedding_collection.embeddings."
    tables = [(key[len(prefix):-len(".weight")], value) for key, value in state.items()
              if key.startswith(prefix) and key.endswith(".weight")]
    if len(tables) != 1:
        raise ValueError(
            f"the checkpoint must hold exactly one {prefix}<table>.weight; found {[name for name, _ in tables]}"
        )
    return tables[0]


def build_model_from_config(
    config: "Any",
    state: Optional[Mapping[str, torch.Tensor]] = None,
    kernel: Optional[str] = None,
    fp8_quant_mode: Optional[int] = None,
    num_items: Optional[int] = None,
) -> nn.Module:
    """An ``HSTURanking`` (config with ``tasks``) or ``HSTURetrieval`` (without) from a config.

    Sizes the config does not hold (table rows, item tower / fusion / gap-bucket widths) are
    read from the checkpoint's tensors, then the checkpoint is loaded strictly.

    Args:
        config: ``HSTUModel`` message.
        state: model state dict (None: random init; then ``num_items`` or
            ``config.num_items`` is needed).
        kernel: override of ``config.kernel`` (e.g. ``"PYTORCH"``).
        fp8_quant_mode: if given, set on every channel's STU (-1..5).
        num_items: table rows when there is no checkpoint and ``config.num_items`` is 0.

    Returns:
        The model (train mode, CPU).
    """
    from torchrec_hstu.config import build_multi_channel, build_retrieval_transducer, hstu_pb2, validate_config
    from torchrec_hstu.models.ranking import HSTURanking
    from torchrec_hstu.models.retrieval import HSTURetrieval

    if fp8_quant_mode is not None or kernel is not None:
        copy = hstu_pb2.HSTUModel()
        copy.CopyFrom(config)
        if fp8_quant_mode is not None:
            for channel in copy.hstu:
                channel.stu.fp8_quant_mode = fp8_quant_mode
        if kernel is not None:
            copy.kernel = hstu_pb2.Kernel.Value(str(kernel).upper())
        validate_config(copy)
        config = copy
    table_name, rows, dim = "item_table", None, None
    if state is not None:
        table_name, weight = _find_table(state)
        rows, dim = int(weight.shape[0]), int(weight.shape[1])
    rows = rows or num_items or int(config.num_items)
    if not rows:
        raise ValueError("num_items is unknown: give a checkpoint, num_items, or set num_items in the config")
    if config.num_items and int(config.num_items) != rows:
        raise ValueError(f"config num_items={config.num_items} but the checkpoint's table has {rows} rows")
    item_dim = int(config.item_embedding_dim) or (dim or int(config.hstu[0].stu.embedding_dim))
    if dim is not None and dim != item_dim:
        raise ValueError(f"config item_embedding_dim={item_dim} but the checkpoint's table is {dim} wide")

    def width(key: str, default: int) -> int:
        return int(state[key].shape[0]) if state is not None and key in state else default

    if len(config.tasks) > 0:
        model: nn.Module = HSTURanking(
            num_items=rows,
            item_embedding_dim=item_dim,
            encoder=build_multi_channel(config),
            task_names=[task.task_name for task in config.tasks],
            item_mlp_hidden_dim=width("item_mlp.0.weight", 128),
            fusion_hidden_dim=width("fusion.0.weight", 128),
            table_name=table_name,
        )
    else:
        gap_buckets = 32 if state is None else width("gap_embeddings.weight", 0)
        transducer, _ = build_retrieval_transducer(config)
        model = HSTURetrieval(
            num_items=rows,
            embedding_dim=item_dim,
            transducer=transducer,
            num_gap_buckets=gap_buckets,
            table_name=table_name,
        )
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                "the checkpoint does not match the config: "
                f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
            )
    return model


# -- CLI -----------------------------------------------------------------------------------


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m torchrec_hstu.export",
        description="Export an HSTU model (config + checkpoint) to an AOTInductor .pt2 package "
        "with a JSON input signature beside it.",
    )
    parser.add_argument("--config", required=True, help="text-format HSTUModel config (.pbtxt)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint (state dict or {'model': state dict})")
    parser.add_argument("--out", required=True, help="package path, ending in .pt2")
    parser.add_argument("--max-batch-size", type=int, default=64, help="largest batch (default 64)")
    parser.add_argument(
        "--max-seq-len", type=int, default=None,
        help="bound on a sequence (history + candidates); default the config's max_seq_len",
    )
    parser.add_argument("--device", default="cpu", help="device the package runs on: cpu or cuda")
    parser.add_argument("--kernel", default=None, help="override the config's attention kernel")
    parser.add_argument(
        "--fp8-quant-mode", type=int, default=None, help="set every channel's fp8_quant_mode (-1..5)"
    )
    parser.add_argument(
        "--mixed-precision", choices=("bf16", "fp16"), default=None,
        help="trace under torch.autocast with this dtype (weights stay float32)",
    )
    parser.add_argument(
        "--fast-compile", action="store_true",
        help="build the C++ at -O0 (aot_inductor.debug_compile): faster compile, slower package",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (2 for bad arguments or inputs)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from torchrec_hstu.config import ConfigError, load_config

    try:
        if not os.path.isfile(args.config):
            raise FileNotFoundError(f"config not found: {args.config}")
        with open(args.config, "r", encoding="utf-8") as handle:
            config_text = handle.read()
        config = load_config(args.config)
        state = load_checkpoint_state(args.checkpoint)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} requested but CUDA is not available")
        model = build_model_from_config(config, state, kernel=args.kernel, fp8_quant_mode=args.fp8_quant_mode)
        model = model.to(device)
        max_seq_len = args.max_seq_len if args.max_seq_len is not None else (int(config.max_seq_len) or None)
        if max_seq_len is None:
            raise ValueError("the config has no max_seq_len; pass --max-seq-len")
        inductor_configs = {"aot_inductor.debug_compile": True} if args.fast_compile else None
        autocast_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
        result = export_model(
            model, args.out, args.max_batch_size, max_seq_len, config_text, inductor_configs, autocast_dtype
        )
    except (ConfigError, FileNotFoundError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sig = result.signature
    print(
        f"wrote {result.package_path} and {result.signature_path}: {sig.model_type}, inputs "
        f"{sig.input_names}, dims {sig.dims}, FP8 modes {sig.fp8_quant_modes}, export "
        f"{sig.export_seconds:.1f} s, AOTInductor {sig.compile_seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
