"""The input signature of an exported package: what it takes, returns, and which bytes it is.

Written as JSON beside the ``.pt2`` by :mod:`torchrec_hstu.export` and read by
:mod:`torchrec_hstu.predict`, which imports this module only (not the exporter, not the
models). The signature names the package it belongs to by the sha256 of its bytes and records
the model's sizes, which the package also carries in its AOTInductor metadata: a ``.pt2`` and
a ``.json`` from different exports, or a package whose bytes changed, are refused before the
package is loaded (digest) and before it runs (sizes).

Example::

    >>> signature = ModelSignature.load("model.json")  # doctest: +SKIP
    >>> signature.check_package("model.pt2")  # doctest: +SKIP
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional

import torch

from torchrec_hstu.cli import UserError, file_sha256

__all__ = [
    "RANKING",
    "RETRIEVAL",
    "SIGNATURE_VERSION",
    "SIZES_METADATA_KEY",
    "InputSpec",
    "ModelSignature",
    "file_sha256",
    "signature_path_for",
]

#: Version of the package format: the signature JSON layout and the op schemas the program calls
#: (2: ``torchrec_hstu::hstu_fp8_fwd`` records the exported kernel; 3: ``package_sha256`` and
#: ``model_sizes``, also in the package metadata). Other versions are refused with a
#: "re-export" message.
SIGNATURE_VERSION = 3
#: Kinds of models the exporter writes.
RETRIEVAL = "retrieval"
RANKING = "ranking"
#: Key of the JSON of :attr:`ModelSignature.model_sizes` in the package's AOTInductor metadata.
SIZES_METADATA_KEY = "torchrec_hstu.model_sizes"


@dataclasses.dataclass
class InputSpec:
    """One flat input of the exported program.

    Attributes:
        name: argument name (the model's ``forward`` argument).
        dtype: ``"int64"``.
        shape: one symbol per dim (e.g. ``["L"]``, ``["K*B"]``), keys of
            :attr:`ModelSignature.dims`, optionally times ``K`` (channels).
        description: what it holds.
    """

    name: str
    dtype: str
    shape: List[str]
    description: str = ""


@dataclasses.dataclass
class ModelSignature:
    """What a package takes and returns, and which package it is; JSON beside the ``.pt2``.

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
        model_sizes: the model's sizes (``num_items``, table width, channels, tasks, bounds),
            also stored in the package's metadata (:data:`SIZES_METADATA_KEY`).
        package_sha256: sha256 of the ``.pt2`` this signature belongs to (None until compiled).
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
    model_sizes: Dict[str, int] = dataclasses.field(default_factory=dict)
    package_sha256: Optional[str] = None
    config: Optional[str] = None
    torch_version: str = torch.__version__
    export_seconds: float = 0.0
    compile_seconds: float = 0.0
    version: int = SIGNATURE_VERSION

    @property
    def input_names(self) -> List[str]:
        """The inputs' names, in program order."""
        return [spec.name for spec in self.inputs]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> "ModelSignature":
        """Inverse of :meth:`to_dict`.

        Raises:
            UserError: another layout version.
        """
        if payload.get("version") != SIGNATURE_VERSION:
            raise UserError(
                f"signature version must be {SIGNATURE_VERSION}; got {payload.get('version')!r} "
                "(re-export the model with this version of torchrec_hstu.export)"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in payload.items() if k in fields}
        values["inputs"] = [InputSpec(**spec) for spec in payload["inputs"]]
        return cls(**values)

    def save(self, path: str) -> None:
        """Write the JSON to ``path`` (callers that need atomicity write to a temporary name)."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")

    @classmethod
    def load(cls, path: str) -> "ModelSignature":
        """Read a signature JSON.

        Raises:
            FileNotFoundError: no such file; UserError: not a signature of this version.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"signature file not found: {path} (torchrec_hstu.export writes it beside the .pt2)"
            )
        with open(path, "r", encoding="utf-8") as handle:
            try:
                payload = json.load(handle)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(payload, Mapping):
            raise UserError(f"{path}: not a torchrec_hstu export signature (a JSON object)")
        try:
            return cls.from_dict(payload)
        except UserError as err:
            raise UserError(f"{path}: {err}") from err
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: not a torchrec_hstu export signature ({err})") from err

    def check_package(self, package_path: str) -> None:
        """Refuse a package whose bytes are not the ones this signature was written for.

        Args:
            package_path: the ``.pt2``.

        Raises:
            UserError: no digest recorded, or the file's sha256 differs (another export's
                package, a truncated copy, changed bytes).
        """
        if not self.package_sha256:
            raise UserError(f"the signature of {package_path} records no package digest; re-export the model")
        actual = file_sha256(package_path)
        if actual != self.package_sha256:
            raise UserError(
                f"{package_path} is not the package its signature {signature_path_for(package_path)} was "
                f"written for (sha256 {actual[:12]}..., the signature expects {self.package_sha256[:12]}...): "
                "the files come from different exports or the package was changed or truncated; re-export"
            )

    def check_package_sizes(self, package_path: str, metadata: Mapping[str, str]) -> None:
        """Refuse a loaded package whose recorded model sizes differ from the signature's.

        Args:
            package_path: the ``.pt2`` (for the message).
            metadata: the loaded package's AOTInductor metadata.

        Raises:
            UserError: sizes missing or different (e.g. a signature allowing more item ids than
                the package's table has rows).
        """
        text = metadata.get(SIZES_METADATA_KEY)
        if text is None:
            raise UserError(f"{package_path} records no model sizes ({SIZES_METADATA_KEY}); re-export the model")
        sizes = json.loads(text)
        expected = dict(self.model_sizes)
        # The bounds predict checks requests against are the top-level fields: they must agree too.
        for name in ("num_items", "max_seq_len", "max_batch_size"):
            expected[name] = getattr(self, name)
        different = {name: (sizes.get(name), value) for name, value in expected.items() if sizes.get(name) != value}
        if different or set(sizes) != set(expected):
            detail = ", ".join(f"{name}: package {got}, signature {want}" for name, (got, want) in different.items())
            raise UserError(
                f"{package_path} was exported with other model sizes than its signature states ({detail or sizes}); "
                "use the .json written with this package or re-export"
            )


def signature_path_for(package_path: str) -> str:
    """``model.pt2`` -> ``model.json`` (the signature beside the package)."""
    root, _ = os.path.splitext(package_path)
    return root + ".json"
