"""One spec per exportable model kind: inputs, dims, example batch, how the program calls it.

The exporter (:mod:`torchrec_hstu.export.exporter`) is written once against
:class:`ModelSpec`; a model kind is a subclass that states its flat inputs (each an
:class:`~torchrec_hstu.export.signature.InputSpec` whose shape symbols also give the dynamic
shapes), its example batch, how the program calls the model on the named inputs, its STU layers
per channel and its sizes. :func:`spec_for` picks the spec of a model.

Symbols: ``B`` requests, ``K`` channels, ``L`` / ``Lh`` history tokens, ``T`` candidates.
"""

import contextlib
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union, cast

import torch
from torch import nn

from torchrec_hstu.export.signature import RANKING, RETRIEVAL, InputSpec

if TYPE_CHECKING:
    from torchrec_hstu.models.ranking import HSTURanking
    from torchrec_hstu.models.retrieval import HSTURetrieval
    from torchrec_hstu.modules.stu import STULayer

__all__ = ["ExportWrapper", "ModelSpec", "RankingSpec", "RetrievalSpec", "SPECS", "autocast_context", "spec_for"]


def autocast_context(device_type: str, dtype: Optional[torch.dtype]) -> Any:
    """``torch.autocast(device_type, dtype)``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def longest_sequence(lengths: torch.Tensor, bound: int) -> Any:
    """The largest of ``lengths`` (at least 1) as a size; checked ``<= bound`` when traced.

    In eager mode a Python int; under ``torch.export`` an unbacked ``SymInt`` with the bound as
    a runtime assertion (no guard, no specialization).
    """
    longest = torch.cat([lengths, lengths.new_ones(1)]).max().item()
    torch._check(longest >= 1)
    torch._check(longest <= bound)
    return longest


class ModelSpec:
    """How one kind of model is exported (subclass per kind; see :data:`SPECS`).

    Args:
        model: the model (an instance of :meth:`model_class`).

    Attributes:
        model_type: the signature's ``model_type``.
        inputs: the program's flat inputs in order; their shape symbols are keys of
            :meth:`dims`, ``"K*<symbol>"`` for ``K`` (channels) times one.
        output_name: the signature's ``output_name``.
        output_shape: symbols of the output dims.
    """

    model_type: str = ""
    inputs: Sequence[InputSpec] = ()
    output_name: str = ""
    output_shape: Sequence[str] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def model_class(cls) -> Type[nn.Module]:
        """The model class this spec exports."""
        raise NotImplementedError

    @property
    def input_names(self) -> List[str]:
        return [spec.name for spec in self.inputs]

    @property
    def num_channels(self) -> int:
        """``K``: history channels."""
        return 1

    def dims(self, max_batch_size: int, max_seq_len: int) -> Dict[str, List[int]]:
        """``{symbol: [min, max]}`` of the dynamic dims."""
        raise NotImplementedError

    def dynamic_shapes(self, dims: Mapping[str, Sequence[int]]) -> Tuple[Tuple[Dict[int, Any], ...]]:
        """``dynamic_shapes`` for ``torch.export`` of :class:`ExportWrapper` (one tuple: its ``*inputs``)."""
        from torch.export import Dim

        symbols = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in dims.items()}
        shapes = []
        for spec in self.inputs:
            (symbol,) = spec.shape
            factor, _, name = symbol.rpartition("*")
            dim = symbols[name]
            shapes.append({0: self.num_channels * dim if factor == "K" else dim})
        return (tuple(shapes),)

    def example_inputs(self, max_seq_len: int, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """A small valid batch ``{input name: CPU int64 tensor}``."""
        raise NotImplementedError

    def call(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], max_seq_len: int) -> torch.Tensor:
        """The program body: ``model`` on the named inputs, bound ``max_seq_len`` asserted."""
        raise NotImplementedError

    def stu_layers(self) -> Dict[str, List["STULayer"]]:
        """``{channel: [STULayer, ...]}`` (``"transducer"`` for a single transducer)."""
        raise NotImplementedError

    def default_max_seq_len(self) -> Optional[int]:
        """The bound when the caller gives none (None: the caller must give one)."""
        return None

    def check(self, max_seq_len: int) -> None:
        """Refuse a model or bound this kind cannot export (``ValueError``)."""

    def signature_fields(self) -> Dict[str, Any]:
        """Extra :class:`~torchrec_hstu.export.signature.ModelSignature` fields (channels, tasks)."""
        return {}

    def model_sizes(self) -> Dict[str, int]:
        """Sizes recorded in the signature and in the package metadata."""
        raise NotImplementedError

    def table_rows(self) -> int:
        """Rows of the item table."""
        # Either model kind (a subclass's ``model``): both have ``embedding_collection`` and ``table_name``.
        model: Any = self.model
        return int(model.embedding_collection.embeddings[model.table_name].weight.shape[0])


def _ids(generator: torch.Generator, num_items: int, n: int) -> torch.Tensor:
    return torch.randint(0, num_items, (n,), generator=generator)


def _timestamps(generator: torch.Generator, lengths: Sequence[int]) -> torch.Tensor:
    parts = [torch.sort(torch.randint(0, 10_000_000, (n,), generator=generator)).values for n in lengths]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class RetrievalSpec(ModelSpec):
    """:class:`~torchrec_hstu.models.retrieval.HSTURetrieval` -> ``scores [B, num_items]``."""

    model: "HSTURetrieval"
    model_type = RETRIEVAL
    inputs = (
        InputSpec("item_ids", "int64", ["L"], "history item ids, sequences back to back (oldest first)"),
        InputSpec("lengths", "int64", ["B"], "history length of each request (>= 1)"),
        InputSpec("timestamps", "int64", ["L"], "seconds, one per history item, non-decreasing per request"),
    )
    output_name = "scores"
    output_shape = ("B", "num_items")

    @classmethod
    def model_class(cls) -> Type[nn.Module]:
        from torchrec_hstu.models.retrieval import HSTURetrieval

        return HSTURetrieval

    def dims(self, max_batch_size: int, max_seq_len: int) -> Dict[str, List[int]]:
        return {"B": [1, max_batch_size], "L": [1, max_batch_size * max_seq_len]}

    def example_inputs(self, max_seq_len: int, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        lengths = [max(1, min(max_seq_len, 2 + b)) for b in range(batch_size)]
        return {
            "item_ids": _ids(generator, self.table_rows(), sum(lengths)),
            "lengths": torch.tensor(lengths),
            "timestamps": _timestamps(generator, lengths),
        }

    def call(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], max_seq_len: int) -> torch.Tensor:
        lengths = inputs["lengths"]
        return model(inputs["item_ids"], lengths, inputs["timestamps"], longest_sequence(lengths, max_seq_len))

    def stu_layers(self) -> Dict[str, List["STULayer"]]:
        return {"transducer": cast(List["STULayer"], list(self.model.transducer.stu_module.layers))}

    def check(self, max_seq_len: int) -> None:
        rows = self.table_rows()
        if int(self.model.num_items) != rows:
            raise ValueError(
                f"the model scores num_items={self.model.num_items} items but its item table has {rows} rows; "
                "a package would index past the table (build the model with num_items equal to the table rows)"
            )

    def model_sizes(self) -> Dict[str, int]:
        model = self.model
        return {
            "num_items": self.table_rows(),
            "item_embedding_dim": int(model.embedding_dim),
            "num_gap_buckets": int(model.num_gap_buckets),
            "num_channels": 1,
            "num_outputs": int(model.num_items),
        }


class RankingSpec(ModelSpec):
    """:class:`~torchrec_hstu.models.ranking.HSTURanking` -> ``logits [T, num_tasks]``."""

    model: "HSTURanking"
    model_type = RANKING
    inputs = (
        InputSpec("history_ids", "int64", ["Lh"], "history item ids, channel-major, requests back to back"),
        InputSpec("history_lengths", "int64", ["K*B"], "history length per (channel, request), channel-major"),
        InputSpec("history_timestamps", "int64", ["Lh"], "seconds, one per history item, non-decreasing per history"),
        InputSpec("history_actions", "int64", ["Lh"], "action bitmask per history item (>= 0)"),
        InputSpec("candidate_ids", "int64", ["T"], "candidate item ids, requests back to back"),
        InputSpec("num_targets", "int64", ["B"], "candidates per request"),
        InputSpec("candidate_timestamps", "int64", ["T"], "seconds (request time), one per candidate"),
    )
    output_name = "logits"
    output_shape = ("T", "num_tasks")

    @classmethod
    def model_class(cls) -> Type[nn.Module]:
        from torchrec_hstu.models.ranking import HSTURanking

        return HSTURanking

    @property
    def num_channels(self) -> int:
        return len(self.model.channels)

    def dims(self, max_batch_size: int, max_seq_len: int) -> Dict[str, List[int]]:
        tokens = max_batch_size * max_seq_len
        return {"B": [1, max_batch_size], "Lh": [0, self.num_channels * tokens], "T": [1, tokens]}

    def example_inputs(self, max_seq_len: int, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        num_items = self.table_rows()
        targets = [1 + b % 2 for b in range(batch_size)]
        history = [
            max(0, min(max_seq_len - targets[b], 2 + b + c))
            for c in range(self.num_channels)
            for b in range(batch_size)
        ]
        total_targets = sum(targets)
        return {
            "history_ids": _ids(generator, num_items, sum(history)),
            "history_lengths": torch.tensor(history),
            "history_timestamps": _timestamps(generator, history),
            "history_actions": torch.randint(0, 4, (sum(history),), generator=generator),
            "candidate_ids": _ids(generator, num_items, total_targets),
            "num_targets": torch.tensor(targets),
            "candidate_timestamps": torch.full((total_targets,), 10_000_001, dtype=torch.int64),
        }

    def call(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], max_seq_len: int) -> torch.Tensor:
        # The multi-channel encoder reads each channel's exact maximum from the lengths itself;
        # here only the bound on history + candidates is asserted.
        per_channel = inputs["history_lengths"].view(self.num_channels, -1) + inputs["num_targets"].unsqueeze(0)
        longest_sequence(per_channel.flatten(), max_seq_len)
        return model(**inputs)

    def stu_layers(self) -> Dict[str, List["STULayer"]]:
        return {
            name: cast(List["STULayer"], list(self.model.encoder.channel(name).stu_module.layers))
            for name in self.model.channels
        }

    def default_max_seq_len(self) -> Optional[int]:
        bound = int(self.model.encoder.max_seq_len)
        return bound if bound > 0 else None

    def check(self, max_seq_len: int) -> None:
        bound = int(self.model.encoder.max_seq_len)
        if 0 < bound < max_seq_len:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds the ranking encoder's max_seq_len={bound}; "
                "export with a bound <= the model's"
            )

    def signature_fields(self) -> Dict[str, Any]:
        return {"channels": list(self.model.channels), "task_names": list(self.model.task_names)}

    def model_sizes(self) -> Dict[str, int]:
        return {
            "num_items": self.table_rows(),
            "item_embedding_dim": int(self.model.item_embedding_dim),
            "num_channels": self.num_channels,
            "num_outputs": len(self.model.task_names),
        }


#: The exportable model kinds.
SPECS: Tuple[Type[ModelSpec], ...] = (RetrievalSpec, RankingSpec)


def spec_for(model: nn.Module) -> ModelSpec:
    """The spec of ``model``.

    Raises:
        TypeError: a model no spec exports.
    """
    for spec_class in SPECS:
        if isinstance(model, spec_class.model_class()):
            return spec_class(model)
    supported = ", ".join(f"{c.model_class().__module__}.{c.model_class().__name__}" for c in SPECS)
    raise TypeError(f"export supports {supported}; got {type(model).__name__}")


class ExportWrapper(nn.Module):
    """The exported module: flat ``*inputs`` in the spec's order -> the model's output.

    Args:
        spec: the model's spec (its model becomes this module's ``model``).
        max_seq_len: bound on a sequence, asserted inside the program.
        autocast_dtype: run the model under ``torch.autocast`` with this dtype (None: off).
    """

    def __init__(self, spec: ModelSpec, max_seq_len: int, autocast_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.model = spec.model
        self.spec = spec
        self.max_seq_len = max_seq_len
        self.autocast_dtype = autocast_dtype
        self.device_type = cast("Union[HSTURetrieval, HSTURanking]", spec.model).dense_device().type

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The spec's inputs, in order -> the model's output."""
        named = dict(zip(self.spec.input_names, inputs))
        with autocast_context(self.device_type, self.autocast_dtype):
            return self.spec.call(self.model, named, self.max_seq_len)
