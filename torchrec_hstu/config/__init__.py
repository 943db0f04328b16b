"""Protobuf configuration of torchrec-hstu: schema, ``config_to_kwargs``, validation, builders.

Importing this package loads the schema, loader and validation only (no torchrec, no
``torchrec_hstu.modules``); the builders (``build_transducer``, ...) load
:mod:`torchrec_hstu.config.builders`, and the modules with it, on first use.

Schema: ``hstu.proto`` (proto2, package ``torchrec_hstu.config``), generated code
``hstu_pb2.py`` (committed; regenerate with ``scripts/gen_proto.sh``). Messages: ``STU``,
``HSTU`` (one transducer / channel), ``HSTUModel`` (channels + model-level fields), the
positional encoder / preprocessor / postprocessor messages and the ``Kernel`` enum.

Example::

    >>> from torchrec_hstu.config import hstu_pb2, config_to_kwargs
    >>> from torchrec_hstu.modules import STULayer
    >>> stu = hstu_pb2.STU(embedding_dim=16, num_heads=2, hidden_dim=8, attention_dim=8)
    >>> layer = STULayer(**config_to_kwargs(stu))
    >>> layer.attention_options.scaling_seqlen
    -1
"""

from typing import Any

from torchrec_hstu.config import hstu_pb2
from torchrec_hstu.config.generated import check_generated_code
from torchrec_hstu.config.kwargs import config_to_kwargs
from torchrec_hstu.config.loader import load_config, parse_config
from torchrec_hstu.config.validation import (
    ConfigError,
    kernel_supports_sla,
    validate_config,
    validate_hstu,
    validate_model,
    validate_stu,
)

#: Names served lazily from :mod:`torchrec_hstu.config.builders` (PEP 562).
_BUILDERS = (
    "build_input_preprocessor",
    "build_multi_channel",
    "build_output_postprocessor",
    "build_positional_encoder",
    "build_retrieval_transducer",
    "build_transducer",
)


def __getattr__(name: str) -> Any:
    if name in _BUILDERS:
        from torchrec_hstu.config import builders

        return getattr(builders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_BUILDERS))


HSTU = hstu_pb2.HSTU
HSTUModel = hstu_pb2.HSTUModel
STU = hstu_pb2.STU

__all__ = [
    "ConfigError",
    "HSTU",
    "HSTUModel",
    "STU",
    "build_input_preprocessor",
    "build_multi_channel",
    "build_output_postprocessor",
    "build_positional_encoder",
    "build_retrieval_transducer",
    "build_transducer",
    "check_generated_code",
    "config_to_kwargs",
    "hstu_pb2",
    "kernel_supports_sla",
    "load_config",
    "parse_config",
    "validate_config",
    "validate_hstu",
    "validate_model",
    "validate_stu",
]
