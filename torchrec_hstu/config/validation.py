"""Config validation: every error names the field (as a path) and the bad value.

The checks run before any module is built, so a bad ``.pbtxt`` fails with
``ConfigError: hstu[1].stu.num_heads must be a positive int; got 0`` rather than deep inside
a constructor. Which kernel can run which options is the backend table's to say
(:func:`torchrec_hstu.ops.backends.kernel_supports`).
"""

from typing import Dict, Optional, Union

from google.protobuf.message import Message

from torchrec_hstu.config import hstu_pb2
from torchrec_hstu.config.kwargs import shortest_float32
from torchrec_hstu.ops.backends import kernel_supports
from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel, check_stu_dims, to_kernel

__all__ = [
    "ConfigError",
    "kernel_supports_sla",
    "normalize_kernel",
    "validate_config",
    "validate_hstu",
    "validate_model",
    "validate_stu",
]

KernelLike = Union[HSTUKernel, str, int]

_TIME_BUCKET_FNS = ("sqrt", "log")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field path and the value."""


def normalize_kernel(kernel: KernelLike) -> HSTUKernel:
    """``HSTUKernel`` from an ``HSTUKernel``, its name, or the proto ``Kernel`` enum number."""
    if isinstance(kernel, int) and not isinstance(kernel, bool):
        try:
            kernel = hstu_pb2.Kernel.Name(kernel)
        except ValueError:
            raise ConfigError(
                f"kernel must be one of {list(hstu_pb2.Kernel.keys())}; got enum number {kernel}"
            ) from None
    try:
        return to_kernel(kernel)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def kernel_supports_sla(kernel: KernelLike) -> bool:
    """Whether ``kernel`` can run Semi-Local Attention (``sla_k1`` / ``sla_k2``), as the backend
    table says.

    Args:
        kernel: :class:`HSTUKernel`, its name, or the proto ``Kernel`` number.

    Returns:
        True when the kernel (as installed here, for CUTLASS) declares SLA.
    """
    return kernel_supports(normalize_kernel(kernel), AttentionOptions(sla_k1=1)) is None


def _fail(path: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"{path} {expected}; got {value!r}")


def _check_required(message: Message, path: str) -> None:
    missing = message.FindInitializationErrors()
    if missing:
        where = ", ".join(f"{path}.{name}" if path else name for name in missing)
        raise ConfigError(f"missing required field(s): {where}")


def _positive(message: Message, name: str, path: str) -> None:
    value = getattr(message, name)
    if value <= 0:
        raise _fail(f"{path}.{name}", "must be a positive int", value)


def _ratio(message: Message, name: str, path: str) -> None:
    value = getattr(message, name)
    if not 0.0 <= value < 1.0:
        raise _fail(f"{path}.{name}", "must be in [0, 1)", shortest_float32(value))


def validate_stu(stu: hstu_pb2.STU, path: str = "stu", kernel: Optional[KernelLike] = None) -> None:
    """Check one ``STU`` message.

    Args:
        stu: the message.
        path: its path in the config, used in error messages.
        kernel: the model's kernel (checked against SLA) or None to skip that check.

    Raises:
        ConfigError: naming the field and its value.
    """
    _check_required(stu, path)
    # The layer's rules live in check_stu_dims and AttentionOptions alone (STULayerConfig asks
    # them too); their ValueError comes back here with the field's path.
    try:
        check_stu_dims(stu.embedding_dim, stu.num_heads, stu.hidden_dim, stu.attention_dim,
                       shortest_float32(stu.output_dropout_ratio), stu.contextual_seq_len,
                       shortest_float32(stu.attn_alpha), stu.uvqk_activation)
        options = AttentionOptions(
            max_attn_len=max(stu.max_attn_len, 0),
            contextual_seq_len=max(stu.contextual_seq_len, 0),
            sla_k1=stu.sla_k1,
            sla_k2=stu.sla_k2,
            scaling_seqlen=stu.scaling_seqlen,
            fp8_quant_mode=stu.fp8_quant_mode,
        )
    except ValueError as err:
        raise _with_path(path, stu, err) from None
    if kernel is None:
        return
    sla_on = options.use_sla
    lacking = kernel_supports(
        normalize_kernel(kernel), options, stu.attention_dim, stu.hidden_dim)
    if lacking is not None:
        name = normalize_kernel(kernel).value
        if sla_on and not kernel_supports_sla(kernel):
            raise ConfigError(
                f"kernel={name!r} cannot run Semi-Local Attention ({path}.sla_k1={stu.sla_k1}, "
                f"{path}.sla_k2={stu.sla_k2}); use kernel PYTORCH, TRITON or AUTO, or set sla_k1 and "
                "sla_k2 to 0"
            )
        raise ConfigError(f"kernel={name!r} cannot run {lacking} ({path}); the backend table says so")


def _with_path(path: str, message: Message, err: ValueError) -> ConfigError:
    """A dataclass's ``ValueError`` as a :class:`ConfigError` naming the field's path: its text
    starts with the field name (``fp8_quant_mode must be ...``) or is about the message."""
    text = str(err)
    field = text.split(" ", 1)[0]
    if field in message.DESCRIPTOR.fields_by_name:
        return ConfigError(f"{path}.{text}")
    return ConfigError(f"{path}: {text}")


def _contextual_prefix(hstu: hstu_pb2.HSTU) -> int:
    if hstu.HasField("input_preprocessor") and hstu.input_preprocessor.HasField("contextual_preprocessor"):
        return hstu.input_preprocessor.contextual_preprocessor.max_contextual_seq_len
    return 0


def validate_hstu(
    hstu: hstu_pb2.HSTU, path: str = "hstu", kernel: Optional[KernelLike] = None
) -> None:
    """Check one ``HSTU`` (transducer) message, its STU and its sub-modules.

    Args:
        hstu: the message.
        path: its path in the config, used in error messages.
        kernel: the model's kernel, or None to skip kernel checks.

    Raises:
        ConfigError: naming the field and its value.
    """
    _check_required(hstu, path)
    validate_stu(hstu.stu, f"{path}.stu", kernel)
    _ratio(hstu, "input_dropout_ratio", path)
    _positive(hstu, "attn_num_layers", path)
    split, tail = hstu.attn_truncation_split_layer, hstu.attn_truncation_tail_len
    if split > 0 and tail == 0:
        raise _fail(
            f"{path}.attn_truncation_split_layer",
            f"is set but {path}.attn_truncation_tail_len is not; set both or neither",
            split,
        )
    if tail > 0 and split == 0:
        raise _fail(
            f"{path}.attn_truncation_tail_len",
            f"is set but {path}.attn_truncation_split_layer is not; set both or neither",
            tail,
        )
    if split > 0 and not split < hstu.attn_num_layers:
        raise _fail(
            f"{path}.attn_truncation_split_layer",
            f"must be in (0, attn_num_layers={hstu.attn_num_layers})",
            split,
        )
    if hstu.HasField("positional_encoder"):
        pe, pe_path = hstu.positional_encoder, f"{path}.positional_encoder"
        _positive(pe, "num_position_buckets", pe_path)
        if pe.use_time_encoding and pe.num_time_buckets <= 0:
            raise _fail(
                f"{pe_path}.num_time_buckets", "must be > 0 when use_time_encoding is true", pe.num_time_buckets
            )
        if pe.time_bucket_fn not in _TIME_BUCKET_FNS:
            raise _fail(f"{pe_path}.time_bucket_fn", f"must be one of {list(_TIME_BUCKET_FNS)}", pe.time_bucket_fn)
        if pe.time_bucket_increments <= 0:
            raise _fail(
                f"{pe_path}.time_bucket_increments", "must be > 0", shortest_float32(pe.time_bucket_increments)
            )
    if hstu.HasField("input_preprocessor"):
        pre_path = f"{path}.input_preprocessor"
        if hstu.input_preprocessor.WhichOneof("input_preprocessor") is None:
            raise ConfigError(f"{pre_path} is set but chooses no preprocessor (contextual_preprocessor)")
        cp, cp_path = hstu.input_preprocessor.contextual_preprocessor, f"{pre_path}.contextual_preprocessor"
        _positive(cp, "hidden_dim", cp_path)
        if cp.max_contextual_seq_len > 0 and cp.contextual_feature_dim == 0:
            raise _fail(
                f"{cp_path}.contextual_feature_dim",
                f"must be > 0 when max_contextual_seq_len={cp.max_contextual_seq_len}",
                cp.contextual_feature_dim,
            )
        if len(cp.action_weights) > 0 and cp.action_embedding_dim == 0:
            raise _fail(
                f"{cp_path}.action_embedding_dim", "must be > 0 when action_weights are set", cp.action_embedding_dim
            )
    prefix = _contextual_prefix(hstu)
    if hstu.stu.contextual_seq_len >= 0 and hstu.stu.contextual_seq_len != prefix:
        raise _fail(
            f"{path}.stu.contextual_seq_len",
            f"must be -1 or the preprocessor's contextual prefix ({prefix})",
            hstu.stu.contextual_seq_len,
        )
    if hstu.HasField("output_postprocessor"):
        post = hstu.output_postprocessor
        post_path = f"{path}.output_postprocessor"
        if post.WhichOneof("output_postprocessor") is None:
            raise ConfigError(f"{post_path} is set but chooses no postprocessor")
        if post.HasField("timestamp_layernorm_postprocessor"):
            ts = post.timestamp_layernorm_postprocessor
            ts_path = f"{post_path}.timestamp_layernorm_postprocessor"
            if len(ts.time_duration_period_units) == 0:
                raise _fail(f"{ts_path}.time_duration_period_units", "must not be empty", [])
            if len(ts.time_duration_period_units) != len(ts.time_duration_units_per_period):
                raise _fail(
                    f"{ts_path}.time_duration_units_per_period",
                    f"must have as many entries as time_duration_period_units "
                    f"({list(ts.time_duration_period_units)})",
                    list(ts.time_duration_units_per_period),
                )


def validate_model(model: hstu_pb2.HSTUModel) -> None:
    """Check an ``HSTUModel``: every channel, channel names, and model-level fields.

    Raises:
        ConfigError: naming the field and its value.
    """
    _check_required(model, "")
    kernel = normalize_kernel(model.kernel)
    if len(model.hstu) == 0:
        raise ConfigError("hstu must have at least one channel; got 0")
    for index, hstu in enumerate(model.hstu):
        validate_hstu(hstu, f"hstu[{index}]", kernel)
    if len(model.hstu) >= 2:
        seen: Dict[str, int] = {}
        for index, hstu in enumerate(model.hstu):
            if not hstu.name:
                raise _fail(
                    f"hstu[{index}].name",
                    f"must be non-empty when the model has {len(model.hstu)} channels",
                    hstu.name,
                )
            if hstu.name in seen:
                raise _fail(
                    f"hstu[{index}].name", f"must be unique; hstu[{seen[hstu.name]}] has the same name", hstu.name
                )
            seen[hstu.name] = index
    for index, hstu in enumerate(model.hstu):
        if hstu.name and hstu.name == model.candidate_feature_name:
            raise _fail(
                f"hstu[{index}].name", "must differ from candidate_feature_name", hstu.name
            )
        if hstu.HasField("input_preprocessor"):
            if model.item_embedding_dim == 0:
                raise _fail(
                    "item_embedding_dim",
                    f"must be > 0 (input width of hstu[{index}].input_preprocessor)",
                    model.item_embedding_dim,
                )
        elif model.item_embedding_dim not in (0, hstu.stu.embedding_dim):
            raise _fail(
                "item_embedding_dim",
                f"must equal hstu[{index}].stu.embedding_dim={hstu.stu.embedding_dim} when that "
                "channel has no input_preprocessor",
                model.item_embedding_dim,
            )
    if not model.candidate_feature_name:
        raise _fail("candidate_feature_name", "must be non-empty", model.candidate_feature_name)
    names = [task.task_name for task in model.tasks]
    for index, name in enumerate(names):
        if not name or names.index(name) != index:
            raise _fail(f"tasks[{index}].task_name", "must be non-empty and unique", name)


def validate_config(message: Message) -> None:
    """Validate an ``HSTUModel``, ``HSTU`` or ``STU`` message (dispatch on its type).

    Raises:
        ConfigError: naming the field and its value.
        TypeError: for other message types.
    """
    if isinstance(message, hstu_pb2.HSTUModel):
        validate_model(message)
    elif isinstance(message, hstu_pb2.HSTU):
        validate_hstu(message)
    elif isinstance(message, hstu_pb2.STU):
        validate_stu(message)
    else:
        raise TypeError(
            f"validate_config takes HSTUModel, HSTU or STU messages; got {type(message).__name__}"
        )
