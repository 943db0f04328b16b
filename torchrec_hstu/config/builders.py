"""Build modules from config messages.

Entry points: :func:`build_transducer` (an ``HSTU`` message -> :class:`HSTUTransducer`: the
one way to build a transducer from settings) and :func:`build_multi_channel` (an ``HSTUModel``
message -> :class:`MultiChannelHSTU`). A single layer needs no builder:
``STULayer(**config_to_kwargs(stu))``.

Layers: builders sit above ``modules`` (they import it; no module imports ``config``). Importing
``torchrec_hstu.config`` does not import this file (nor torchrec): its builder names load it on
first use.

Sentinels are resolved as TorchEasyRec does: ``STU.contextual_seq_len = -1`` becomes the input
preprocessor's contextual prefix (0 without one); ``STU.scaling_seqlen = -1`` stays -1 and the
attention op divides by the batch ``max_seq_len`` at run time.
"""

import os
from typing import Any, Callable, Dict, Optional, Tuple, Union

from torchrec_hstu.config import hstu_pb2
from torchrec_hstu.config.kwargs import config_to_kwargs
from torchrec_hstu.config.loader import load_config
from torchrec_hstu.config.validation import (
    ConfigError,
    KernelLike,
    normalize_kernel,
    validate_hstu,
    validate_model,
)
from torchrec_hstu.modules.hstu_transducer import HSTUTransducer
from torchrec_hstu.modules.multi_channel import MultiChannelHSTU
from torchrec_hstu.modules.positional_encoder import HSTUPositionalEncoder
from torchrec_hstu.modules.postprocessors import (
    L2NormPostprocessor,
    LayerNormPostprocessor,
    OutputPostprocessor,
    TimestampLayerNormPostprocessor,
)
from torchrec_hstu.modules.preprocessors import ContextualPreprocessor
from torchrec_hstu.modules.stu import STUStack

__all__ = [
    "build_input_preprocessor",
    "build_multi_channel",
    "build_output_postprocessor",
    "build_positional_encoder",
    "build_retrieval_transducer",
    "build_transducer",
]


def _oneof_choice(kwargs: Dict[str, Any], field: str) -> "tuple[str, Dict[str, Any]]":
    """``{"member": {...}}`` (a oneof after :func:`config_to_kwargs`) -> ``("member", {...})``."""
    if len(kwargs) != 1:
        raise ConfigError(f"{field} must choose exactly one member; got {sorted(kwargs)}")
    (member, member_kwargs), = kwargs.items()
    return member, member_kwargs


def build_positional_encoder(
    kwargs: Dict[str, Any], embedding_dim: int, contextual_seq_len: int
) -> HSTUPositionalEncoder:
    """:class:`HSTUPositionalEncoder` from ``config_to_kwargs(PositionalEncoder)``.

    Args:
        kwargs: the positional encoder's kwargs.
        embedding_dim: the STU ``embedding_dim``.
        contextual_seq_len: the preprocessor's contextual prefix.
    """
    return HSTUPositionalEncoder(embedding_dim=embedding_dim, contextual_seq_len=contextual_seq_len, **kwargs)


_PREPROCESSORS: Dict[str, Callable[..., ContextualPreprocessor]] = {
    "contextual_preprocessor": ContextualPreprocessor,
}


def build_input_preprocessor(
    kwargs: Dict[str, Any], input_embedding_dim: int, output_embedding_dim: int
) -> ContextualPreprocessor:
    """The chosen preprocessor from ``config_to_kwargs(InputPreprocessor)``.

    Args:
        kwargs: ``{"contextual_preprocessor": {...}}``.
        input_embedding_dim: width of the item embeddings.
        output_embedding_dim: the STU ``embedding_dim``.
    """
    member, member_kwargs = _oneof_choice(kwargs, "input_preprocessor")
    return _PREPROCESSORS[member](
        input_embedding_dim=input_embedding_dim, output_embedding_dim=output_embedding_dim, **member_kwargs
    )


_POSTPROCESSORS: Dict[str, Callable[..., OutputPostprocessor]] = {
    "l2norm_postprocessor": lambda embedding_dim, **kw: L2NormPostprocessor(**kw),
    "layernorm_postprocessor": LayerNormPostprocessor,
    "timestamp_layernorm_postprocessor": TimestampLayerNormPostprocessor,
}


def build_output_postprocessor(kwargs: Dict[str, Any], embedding_dim: int) -> OutputPostprocessor:
    """The chosen postprocessor from ``config_to_kwargs(OutputPostprocessor)``.

    Args:
        kwargs: e.g. ``{"layernorm_postprocessor": {"eps": 1e-05}}``.
        embedding_dim: the STU ``embedding_dim``.
    """
    member, member_kwargs = _oneof_choice(kwargs, "output_postprocessor")
    return _POSTPROCESSORS[member](embedding_dim=embedding_dim, **member_kwargs)


def build_transducer(
    config: hstu_pb2.HSTU,
    input_embedding_dim: Optional[int] = None,
    kernel: KernelLike = "PYTORCH",
    return_full_embeddings: bool = False,
    feature_name: Optional[str] = None,
) -> HSTUTransducer:
    """An :class:`HSTUTransducer` from an ``HSTU`` message (validated first).

    Args:
        config: the ``HSTU`` message.
        input_embedding_dim: width of the incoming item embeddings (default: the STU
            ``embedding_dim``); used by the input preprocessor.
        kernel: attention kernel of every layer (:class:`HSTUKernel`, its name or the proto
            ``Kernel`` number); checked against SLA.
        return_full_embeddings: also return every token's output (retrieval).
        feature_name: embeddings-dict key to read (default: ``config.name`` if set).

    Returns:
        The transducer: ``attn_num_layers`` identical STU layers.

    Raises:
        ConfigError: for invalid configs, naming the field and the value.

    Example::

        >>> from google.protobuf import text_format
        >>> cfg = text_format.Parse(
        ...     "stu { embedding_dim: 16 num_heads: 2 hidden_dim: 8 attention_dim: 8 } "
        ...     "attn_num_layers: 2", hstu_pb2.HSTU())
        >>> len(build_transducer(cfg).stu_module.layers)
        2
    """
    if not isinstance(config, hstu_pb2.HSTU):
        raise TypeError(f"build_transducer needs an HSTU message; got {type(config).__name__}")
    kernel = normalize_kernel(kernel)
    validate_hstu(config, "hstu", kernel)
    kwargs = config_to_kwargs(config)
    stu = kwargs["stu"]
    embedding_dim = stu["embedding_dim"]
    preprocessor = None
    if kwargs["input_preprocessor"] is not None:
        preprocessor = build_input_preprocessor(
            kwargs["input_preprocessor"],
            input_embedding_dim=input_embedding_dim if input_embedding_dim else embedding_dim,
            output_embedding_dim=embedding_dim,
        )
    elif input_embedding_dim not in (None, embedding_dim):
        raise ConfigError(
            f"hstu.input_preprocessor is unset, so the input width must equal "
            f"hstu.stu.embedding_dim={embedding_dim}; got input_embedding_dim={input_embedding_dim}"
        )
    contextual_seq_len = preprocessor.contextual_seq_len() if preprocessor is not None else 0
    positional_encoder = None
    if kwargs["positional_encoder"] is not None:
        positional_encoder = build_positional_encoder(
            kwargs["positional_encoder"], embedding_dim, contextual_seq_len
        )
    postprocessor = None
    if kwargs["output_postprocessor"] is not None:
        postprocessor = build_output_postprocessor(kwargs["output_postprocessor"], embedding_dim)
    stack = STUStack.uniform(
        stu,
        kwargs["attn_num_layers"],
        contextual_seq_len=contextual_seq_len,
        attn_truncation_split_layer=kwargs["attn_truncation_split_layer"],
        attn_truncation_tail_len=kwargs["attn_truncation_tail_len"],
        kernel=kernel,
    )
    return HSTUTransducer(
        stack,
        input_preprocessor=preprocessor,
        positional_encoder=positional_encoder,
        output_postprocessor=postprocessor,
        input_dropout_ratio=kwargs["input_dropout_ratio"],
        return_full_embeddings=return_full_embeddings,
        feature_name=feature_name if feature_name is not None else (kwargs["name"] or None),
    )


def build_multi_channel(
    config: hstu_pb2.HSTUModel, kernel: Optional[KernelLike] = None
) -> MultiChannelHSTU:
    """A :class:`MultiChannelHSTU` from an ``HSTUModel`` message (validated first).

    Every channel reads ``[its history | the shared candidates]``; see
    :mod:`torchrec_hstu.modules.multi_channel` for the input contract.

    Args:
        config: the ``HSTUModel`` message (one ``hstu`` per channel).
        kernel: override of ``config.kernel`` (e.g. ``"PYTORCH"`` on a CPU box).

    Returns:
        The model; ``output_dim`` is the sum of the channels' STU ``embedding_dim``.

    Raises:
        ConfigError: for invalid configs, naming the field and the value.
    """
    if not isinstance(config, hstu_pb2.HSTUModel):
        raise TypeError(f"build_multi_channel needs an HSTUModel message; got {type(config).__name__}")
    if kernel is not None:
        config_copy = hstu_pb2.HSTUModel()
        config_copy.CopyFrom(config)
        config_copy.kernel = hstu_pb2.Kernel.Value(normalize_kernel(kernel).value)
        config = config_copy
    validate_model(config)
    channels = []
    for hstu in config.hstu:
        transducer = build_transducer(
            hstu,
            input_embedding_dim=config.item_embedding_dim or None,
            kernel=config.kernel,
            feature_name=hstu.name or None,
        )
        channels.append((hstu.name, transducer))
    return MultiChannelHSTU(
        channels, candidate_feature_name=config.candidate_feature_name, max_seq_len=config.max_seq_len
    )


def build_retrieval_transducer(
    config: Union[hstu_pb2.HSTUModel, str, "os.PathLike[str]"],
    kernel: Optional[KernelLike] = None,
) -> Tuple[HSTUTransducer, int]:
    """The transducer of a single-channel (retrieval) ``HSTUModel`` and its item embedding width.

    A thin layer over :func:`build_transducer` for next-item retrieval: the one channel, built
    with ``return_full_embeddings=True``, input width ``item_embedding_dim``.

    Args:
        config: an ``HSTUModel`` message or the path of its ``.pbtxt``.
        kernel: override of ``config.kernel`` (any case, e.g. ``"auto"``); validated (SLA).

    Returns:
        ``(transducer, item_embedding_dim)``; the width is the STU ``embedding_dim`` when
        ``item_embedding_dim`` is unset.

    Raises:
        ConfigError: invalid config, or not exactly one channel.
    """
    if not isinstance(config, hstu_pb2.HSTUModel):
        config = load_config(config)
    validate_model(config)
    if len(config.hstu) != 1:
        raise ConfigError(f"hstu must have exactly one channel for retrieval; got {len(config.hstu)}")
    hstu = config.hstu[0]
    width = config.item_embedding_dim or hstu.stu.embedding_dim
    transducer = build_transducer(
        hstu,
        input_embedding_dim=width,
        kernel=config.kernel if kernel is None else kernel,
        return_full_embeddings=True,
    )
    return transducer, width
