"""Models from an ``HSTUModel`` config and a checkpoint: one way to build what export serves.

:func:`build_model_from_config` builds an :class:`~torchrec_hstu.models.ranking.HSTURanking`
(config with ``tasks``) or :class:`~torchrec_hstu.models.retrieval.HSTURetrieval` (without)
from the config alone: every width is a config field (``item_mlp_hidden_dim``,
``fusion_hidden_dim``, ``num_gap_buckets`` beside the channels' fields); only the table rows may
come from the checkpoint. A checkpoint that does not fit is refused with the config field that
differs (e.g. ``hstu[0].stu.hidden_dim``). :func:`load_checkpoint_state` reads a checkpoint
with ``torch.load(weights_only=True)`` and turns every way it can fail into one message naming
the file.

Layers: ``config`` builders and ``models`` below, ``export`` / ``predict`` / examples above.

Example::

    >>> from torchrec_hstu.config import load_config
    >>> model = build_model_from_config(load_config("examples/configs/retrieval_small.pbtxt"),
    ...                                 num_items=100)  # doctest: +SKIP
"""

import re
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from torchrec_hstu.cli import UserError, load_torch_file

if TYPE_CHECKING:
    from torchrec_hstu.config import hstu_pb2

__all__ = ["build_model_from_config", "checkpoint_mismatch", "load_checkpoint_state"]

#: Prefix of the item table's weight in a model's state dict.
TABLE_PREFIX = "embedding_collection.embeddings."


def load_checkpoint_state(path: str) -> Dict[str, torch.Tensor]:
    """The model ``state_dict`` in a checkpoint (``torch.load(weights_only=True)``).

    Accepts a bare state dict or a training checkpoint ``{"model": state_dict, ...}``; strips a
    ``module.`` (DDP/DMP) or ``model.`` (training wrapper) prefix shared by every key.

    Args:
        path: the checkpoint file.

    Returns:
        ``{parameter name: tensor}`` on CPU.

    Raises:
        FileNotFoundError: no such file.
        UserError: a file torch cannot read (truncated, not a checkpoint), one that holds code
            (a pickled global other than tensors and plain containers: refused, never run), or
            one without a state dict.
    """
    state = load_torch_file(path, "checkpoint")
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict or a checkpoint with a 'model' state dict of tensors")
    state = dict(state)
    for prefix in ("module.", "model."):
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _find_table(state: Mapping[str, torch.Tensor]) -> Tuple[str, torch.Tensor]:
    tables = [
        (key[len(TABLE_PREFIX) : -len(".weight")], value)
        for key, value in state.items()
        if key.startswith(TABLE_PREFIX) and key.endswith(".weight")
    ]
    if len(tables) != 1:
        raise UserError(
            f"the checkpoint must hold exactly one {TABLE_PREFIX}<table>.weight; found {[name for name, _ in tables]}"
        )
    return tables[0]


def _channel_path(key: str, config: "hstu_pb2.HSTUModel") -> Tuple[Optional[str], str]:
    """``(config path of the channel, rest of the key)`` for a transducer parameter."""
    if key.startswith("transducer."):
        return "hstu[0]", key[len("transducer.") :]
    found = re.match(r"encoder\.channels\.(\d+)\.(.*)", key)
    if found:
        return f"hstu[{found.group(1)}]", found.group(2)
    return None, key


def _stu_difference(path: str, stu: "hstu_pb2.STU", rest: str, state: Mapping[str, torch.Tensor], prefix: str) -> Optional[str]:
    """Which ``STU`` field of ``path`` explains the checkpoint's layer shapes, if one does.

    ``uvqk_weight: [embedding_dim, num_heads * (2 * hidden_dim + 2 * attention_dim)]`` and
    ``output_weight: [3 * num_heads * hidden_dim, embedding_dim]``.
    """
    layer = re.match(r"(stu_module\.layers\.\d+)\.", rest)
    if layer is None:
        return None
    base = prefix + layer.group(1)
    uvqk, output = state.get(base + ".uvqk_weight"), state.get(base + ".output_weight")
    if uvqk is None or output is None or uvqk.dim() != 2 or output.dim() != 2:
        return None
    heads, hidden, attention, width = int(stu.num_heads), int(stu.hidden_dim), int(stu.attention_dim), int(stu.embedding_dim)
    if int(uvqk.shape[0]) != width:
        return f"{path}.stu.embedding_dim: the checkpoint has {int(uvqk.shape[0])}, the config {width}"
    uvqk_width, output_rows = int(uvqk.shape[1]), int(output.shape[0])
    candidates = []
    for name in ("num_heads", "hidden_dim", "attention_dim"):
        for value in range(1, max(uvqk_width, output_rows) + 1):
            sizes = {"num_heads": heads, "hidden_dim": hidden, "attention_dim": attention, name: value}
            h, d, a = sizes["num_heads"], sizes["hidden_dim"], sizes["attention_dim"]
            if h * (2 * d + 2 * a) == uvqk_width and 3 * h * d == output_rows and value != getattr(stu, name):
                candidates.append(f"{path}.stu.{name}: the checkpoint has {value}, the config {getattr(stu, name)}")
    if len(candidates) == 1:
        return candidates[0]
    return (
        f"{path}.stu (num_heads, hidden_dim, attention_dim) = ({heads}, {hidden}, {attention}) but the checkpoint's "
        f"layer has num_heads * hidden_dim = {output_rows // 3} and num_heads * (2 * hidden_dim + 2 * attention_dim) = "
        f"{uvqk_width}"
    )


#: Parameter name patterns -> the config field that sizes them (when no exact solver applies);
#: the last four are fields of the parameter's channel (``hstu[i].``).
_FIELD_HINTS: List[Tuple[str, str]] = [
    (r"^item_mlp\.", "item_mlp_hidden_dim"),
    (r"^fusion\.", "fusion_hidden_dim (or tasks)"),
    (r"^gap_embeddings\.", "num_gap_buckets"),
    (r"positional_encoder\.position_embeddings", "positional_encoder.num_position_buckets"),
    (r"positional_encoder\.timestamp_embeddings", "positional_encoder.num_time_buckets"),
    (r"input_preprocessor\.action", "input_preprocessor.contextual_preprocessor.action_embedding_dim"),
    (r"input_preprocessor\.", "input_preprocessor.contextual_preprocessor.hidden_dim"),
    (r"output_postprocessor\.", "output_postprocessor"),
]


def checkpoint_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], config: "hstu_pb2.HSTUModel") -> Optional[str]:
    """Why ``state`` does not fit ``model`` built from ``config``, naming the config field; None if it fits.

    Args:
        model: the model built from ``config``.
        state: the checkpoint's state dict.
        config: the ``HSTUModel`` message.

    Returns:
        A one-line reason, or None.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    for key in wrong:
        path, rest = _channel_path(key, config)
        if path is not None:
            index = int(path[5:-1])
            stu_reason = _stu_difference(path, config.hstu[index].stu, rest, state, key[: len(key) - len(rest)])
            if stu_reason is not None:
                return stu_reason
        hint = next((field for pattern, field in _FIELD_HINTS if re.search(pattern, key)), None)
        field = "the config" if hint is None else f"config field {path + '.' if path else ''}{hint}"
        return (
            f"{key} has shape {list(state[key].shape)} in the checkpoint but {list(expected[key].shape)} "
            f"in the model built from the config: check {field}"
        )
    if missing or unexpected:
        gap = [key for key in missing + unexpected if key.startswith("gap_embeddings.")]
        if gap and len(missing) + len(unexpected) == len(gap):
            has = "has" if unexpected else "has no"
            return (
                f"the checkpoint {has} a gap embedding (gap_embeddings.weight) but the config's num_gap_buckets is "
                f"{config.num_gap_buckets}; set num_gap_buckets in the config to the trained model's value"
            )
        return (
            "the checkpoint does not match the config (other layers, channels or tasks): "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return None


def build_model_from_config(
    config: "hstu_pb2.HSTUModel",
    state: Optional[Mapping[str, torch.Tensor]] = None,
    kernel: Optional[str] = None,
    fp8_quant_mode: Optional[int] = None,
    num_items: Optional[int] = None,
) -> nn.Module:
    """An ``HSTURanking`` (config with ``tasks``) or ``HSTURetrieval`` (without) from a config.

    Every width comes from the config; the table rows from ``config.num_items``, else the
    checkpoint's table, else ``num_items``. The checkpoint is then loaded strictly.

    Args:
        config: ``HSTUModel`` message.
        state: model state dict (None: random init; then ``num_items`` or
            ``config.num_items`` is needed).
        kernel: override of ``config.kernel`` (e.g. ``"PYTORCH"``).
        fp8_quant_mode: if given, set on every channel's STU (-1..5).
        num_items: table rows when there is no checkpoint and ``config.num_items`` is 0.

    Returns:
        The model (train mode, CPU).

    Raises:
        UserError: a checkpoint that does not fit the config (naming the config field that
            differs), or unknown table rows; ConfigError: an invalid config.
    """
    from torchrec_hstu.config import hstu_pb2, validate_config
    from torchrec_hstu.config.builders import build_multi_channel, build_retrieval_transducer
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
        raise UserError("num_items is unknown: give a checkpoint, num_items, or set num_items in the config")
    if config.num_items and int(config.num_items) != rows:
        raise UserError(f"config field num_items={config.num_items} but the checkpoint's item table has {rows} rows")
    item_dim = int(config.item_embedding_dim) or int(config.hstu[0].stu.embedding_dim)
    if dim is not None and dim != item_dim:
        raise UserError(f"config field item_embedding_dim={item_dim} but the checkpoint's item table is {dim} wide")
    if len(config.tasks) > 0:
        model: nn.Module = HSTURanking(
            num_items=rows,
            item_embedding_dim=item_dim,
            encoder=build_multi_channel(config),
            task_names=[task.task_name for task in config.tasks],
            item_mlp_hidden_dim=int(config.item_mlp_hidden_dim),
            fusion_hidden_dim=int(config.fusion_hidden_dim),
            table_name=table_name,
        )
    else:
        transducer, _ = build_retrieval_transducer(config)
        model = HSTURetrieval(
            num_items=rows,
            embedding_dim=item_dim,
            transducer=transducer,
            num_gap_buckets=int(config.num_gap_buckets),
            table_name=table_name,
        )
    if state is not None:
        reason = checkpoint_mismatch(model, state, config)
        if reason is not None:
            raise UserError(reason)
        model.load_state_dict(state, strict=True)
    return model
