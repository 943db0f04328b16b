"""Export a model to one AOTInductor package (``.pt2``) with a JSON input signature beside it.

The exported program is the whole model from ids to scores: the torchrec
``EmbeddingCollection`` lookup, the HSTU transducer(s) and the head. It is traced with
``torch.export.export(..., strict=False)`` with dynamic dims and compiled with
``torch._inductor.aoti_compile_and_package``; :mod:`torchrec_hstu.predict` loads it with
``torch._inductor.aoti_load_package``.

The package:

* :mod:`~torchrec_hstu.export.signature`: :class:`ModelSignature` (the JSON, with the
  package's sha256 and the model's sizes); :mod:`torchrec_hstu.predict` imports only this.
* :mod:`~torchrec_hstu.export.specs`: one :class:`~torchrec_hstu.export.specs.ModelSpec` per
  model kind (inputs, dynamic dims, example batch, the call the program makes).
* :mod:`~torchrec_hstu.export.exporter`: :func:`export_program`, :func:`compile_package`,
  :func:`export_model`, written once against the spec.
* :mod:`~torchrec_hstu.export.command`: the CLI, ``python -m torchrec_hstu.export``.

The model builder (config + checkpoint -> model) is :mod:`torchrec_hstu.models.build`.

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
``model.eval()`` outputs for any batch within the bounds.

FP8: every STU layer with ``fp8_quant_mode`` in 0..5 becomes one
``torchrec_hstu::hstu_fp8_fwd`` node; the package runs it on CPU through the exact emulation
and on CUDA through CUTLASS / Triton. Loading such a package needs the op library imported:
each op module records itself when it registers (``torchrec_hstu.ops.custom_ops.OP_MODULES``),
the signature lists those modules and :mod:`torchrec_hstu.predict` imports them.

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

Importing this package loads the signature only; the exporter and the CLI load on first use of
their names (PEP 562), so a reader of signatures does not import the exporter.
"""

import importlib
from typing import Any, Dict, List

from torchrec_hstu.export.signature import (
    RANKING,
    RETRIEVAL,
    SIGNATURE_VERSION,
    InputSpec,
    ModelSignature,
    file_sha256,
    signature_path_for,
)

#: Names served lazily, by the module that defines them.
_LAZY: Dict[str, str] = {
    **{
        name: "torchrec_hstu.export.exporter"
        for name in (
            "FP8_OP",
            "ExportResult",
            "check_export_options",
            "compile_package",
            "custom_op_modules",
            "default_inductor_configs",
            "example_inputs",
            "export_model",
            "export_program",
            "fp8_attention_nodes",
        )
    },
    **{name: "torchrec_hstu.export.specs" for name in ("ExportWrapper", "ModelSpec", "SPECS", "autocast_context", "spec_for")},
    "main": "torchrec_hstu.export.command",
    # The model builder lives in the model layer; these names stay importable from here.
    "build_model_from_config": "torchrec_hstu.models.build",
    "load_checkpoint_state": "torchrec_hstu.models.build",
}

__all__ = [
    "RANKING",
    "RETRIEVAL",
    "SIGNATURE_VERSION",
    "InputSpec",
    "ModelSignature",
    "file_sha256",
    "signature_path_for",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))
