"""Read text-format (``.pbtxt``) configs with ``google.protobuf.text_format``."""

import os
from typing import Type, TypeVar, Union

from google.protobuf import text_format
from google.protobuf.message import Message

from torchrec_hstu.config import hstu_pb2
from torchrec_hstu.config.validation import ConfigError, validate_config

__all__ = ["load_config", "parse_config"]

M = TypeVar("M", bound=Message)


def parse_config(
    text: str,
    message_type: Type[M] = hstu_pb2.HSTUModel,
    validate: bool = True,
    source: str = "<string>",
) -> M:
    """Parse a text-format config.

    Args:
        text: the text-format message.
        message_type: ``HSTUModel`` (default), ``HSTU`` or ``STU``.
        validate: run :func:`~torchrec_hstu.config.validate_config`.
        source: name used in error messages (the file name for :func:`load_config`).

    Returns:
        The parsed message.

    Raises:
        ConfigError: ``"<source>:<line>:<col> : <parser message>"`` for syntax errors and
            unknown fields, ``"<source>: <field path> ..."`` for invalid values.

    Example::

        >>> cfg = parse_config("stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 }",
        ...                    hstu_pb2.HSTU)
        >>> cfg.attn_num_layers
        3
    """
    message = message_type()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        raise ConfigError(f"{source}:{err}") from err
    if validate:
        try:
            validate_config(message)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from err
    return message


def load_config(
    path: Union[str, "os.PathLike[str]"],
    message_type: Type[M] = hstu_pb2.HSTUModel,
    validate: bool = True,
) -> M:
    """Load a ``.pbtxt`` file (see :func:`parse_config`); errors name the file.

    Example::

        >>> cfg = load_config("examples/configs/retrieval_small.pbtxt")  # doctest: +SKIP
    """
    path = os.fspath(path)
    with open(path, "r", encoding="utf-8") as handle:
        text = handle.read()
    return parse_config(text, message_type, validate=validate, source=path)
