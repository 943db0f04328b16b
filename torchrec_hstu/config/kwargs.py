"""``config_to_kwargs``: a protobuf message -> the keyword arguments of the module it configures.

The walk is done over the message descriptor, not with ``json_format.MessageToDict``: since
protobuf 5.26 ``MessageToDict`` has no ``including_default_value_fields`` and never prints
unset proto2 ``optional`` fields, which silently drops sentinels such as
``contextual_seq_len = -1`` (notes decision 9). Only descriptor APIs that protobuf 5, 6 and 7
share are used.
"""

import struct
from typing import Any, Dict, List

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

__all__ = ["config_to_kwargs"]


def shortest_float32(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (0.30000001192092896 -> 0.3)."""
    if value != value or value in (float("inf"), float("-inf")):
        return value
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )


def _is_repeated(field: FieldDescriptor) -> bool:
    # FieldDescriptor.label is deprecated in newer runtimes; is_repeated is missing in older.
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated() if callable(is_repeated) else is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return shortest_float32(value)
    return value


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return config_to_kwargs(value)
    return _scalar(field, value)


def config_to_kwargs(message: Message) -> Dict[str, Any]:
    """Keyword arguments named like the message's fields, defaults included.

    Rules, field by field (in declaration order):

    * scalar field: its value if set, else its declared default (``[default = X]``, else the
      type's zero: 0, 0.0, False, ""); sentinels such as -1 are kept. ``float`` fields are given
      as the shortest decimal that is the same float32 (``0.3``, not ``0.30000001192092896``);
      64-bit integers stay ``int``;
    * enum field: the value's name (``"PYTORCH"``);
    * message field: a nested dict built by the same rules if set, else ``None`` (key present);
    * oneof: only the chosen member appears, e.g. ``{"l2norm_postprocessor": {"eps": 1e-06}}``;
      no key at all when none is chosen;
    * repeated field: a list (of dicts for messages); map field: a dict;
    * a field marked ``[deprecated = true]`` (kept only so other tools' configs parse, e.g.
      TorchEasyRec's ``sort_by_length``) is left out: it reaches no constructor.

    Args:
        message: any protobuf message (proto2 schema of :mod:`torchrec_hstu.config`).

    Returns:
        ``{field_name: value}``.

    Example::

        >>> from torchrec_hstu.config import hstu_pb2
        >>> stu = hstu_pb2.STU(embedding_dim=16, num_heads=2, hidden_dim=8, attention_dim=8)
        >>> kwargs = config_to_kwargs(stu)
        >>> kwargs["contextual_seq_len"], kwargs["output_dropout_ratio"], kwargs["sla_k1"]
        (-1, 0.3, 0)
    """
    if not isinstance(message, Message):
        raise TypeError(f"config_to_kwargs needs a protobuf message; got {type(message).__name__}")
    kwargs: Dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if field.GetOptions().deprecated:
            continue
        oneof = field.containing_oneof
        if oneof is not None and message.WhichOneof(oneof.name) != name:
            continue
        value = getattr(message, name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            kwargs[name] = {key: _value(value_field, item) for key, item in value.items()}
        elif _is_repeated(field):
            items: List[Any] = [_value(field, item) for item in value]
            kwargs[name] = items
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            kwargs[name] = config_to_kwargs(value) if message.HasField(name) else None
        else:
            kwargs[name] = _scalar(field, value)
    return kwargs
