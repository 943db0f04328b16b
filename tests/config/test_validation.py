"""Every config error names the field and the bad value."""

import re

import pytest
from google.protobuf import text_format

from torchrec_hstu.config import (
    ConfigError,
    build_multi_channel,
    build_transducer,
    hstu_pb2,
    kernel_supports_sla,
    load_config,
    parse_config,
)
import dataclasses

from torchrec_hstu.ops import backends
from torchrec_hstu.modules import HSTUTransducer, MultiChannelHSTU, STULayer, STUStack
from torchrec_hstu.ops.common import HSTUKernel

STU = "stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 %s }"


def channel(name: str = "", stu_extra: str = "", extra: str = "") -> str:
    return "hstu { %s %s %s }" % (f'name: "{name}"' if name else "", STU % stu_extra, extra)


def model(*channels: str, extra: str = "") -> str:
    return " ".join(channels) + " " + extra


def test_unknown_field_names_the_file(tmp_path):
    path = tmp_path / "bad.pbtxt"
    path.write_text(channel(stu_extra="num_head: 3"))
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r':1:\d+ : .*has no field named "num_head"'):
        load_config(path)


def test_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.pbtxt"
    path.write_text("hstu { stu { embedding_dim: 8 ")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ":"):
        load_config(path)


def test_validation_error_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "zero_heads.pbtxt"
    path.write_text(channel().replace("num_heads: 2", "num_heads: 0"))
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r": hstu\[0\]\.stu\.num_heads must be a positive int; got 0"):
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        (model(channel().replace("num_heads: 2", "num_heads: 0")), r"hstu\[0\]\.stu\.num_heads must be a positive int; got 0"),
        (model(channel().replace("hidden_dim: 4", "hidden_dim: 0")), r"hstu\[0\]\.stu\.hidden_dim must be a positive int; got 0"),
        (model(channel(extra="attn_num_layers: 3 attn_truncation_split_layer: 3 attn_truncation_tail_len: 8")),
         r"hstu\[0\]\.attn_truncation_split_layer must be in \(0, attn_num_layers=3\); got 3"),
        (model(channel(extra="attn_num_layers: 3 attn_truncation_split_layer: 5 attn_truncation_tail_len: 8")),
         r"hstu\[0\]\.attn_truncation_split_layer must be in \(0, attn_num_layers=3\); got 5"),
        (model(channel(extra="attn_truncation_split_layer: 1")),
         r"hstu\[0\]\.attn_truncation_split_layer is set but hstu\[0\]\.attn_truncation_tail_len is not; .*got 1"),
        (model(channel(extra="attn_truncation_tail_len: 16")),
         r"hstu\[0\]\.attn_truncation_tail_len is set but hstu\[0\]\.attn_truncation_split_layer is not; .*got 16"),
        (model(channel(stu_extra="fp8_quant_mode: 6")), r"hstu\[0\]\.stu\.fp8_quant_mode must be an int in \[-1, 5\].*; got 6"),
        (model(channel(stu_extra="fp8_quant_mode: -2")), r"hstu\[0\]\.stu\.fp8_quant_mode must be an int in \[-1, 5\].*; got -2"),
        (model(channel(stu_extra="sla_k1: 4 max_attn_len: 8")), r"hstu\[0\]\.stu: Semi-Local Attention .*replaces the window.*max_attn_len=8"),
        (model(channel("a"), channel("a")), r"hstu\[1\]\.name must be unique; hstu\[0\] has the same name; got 'a'"),
        (model(channel("a"), channel("")), r"hstu\[1\]\.name must be non-empty when the model has 2 channels; got ''"),
        (model(channel("candidates")), r"hstu\[0\]\.name must differ from candidate_feature_name; got 'candidates'"),
        ("", r"hstu must have at least one channel; got 0"),
        (model("hstu { stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 } }"), r"missing required field\(s\): hstu\[0\]\.stu\.attention_dim"),
        (model(channel(stu_extra="output_dropout_ratio: 1.5")), r"hstu\[0\]\.stu\.output_dropout_ratio must be in \[0, 1\); got 1.5"),
        (model(channel(extra="input_dropout_ratio: -0.1")), r"hstu\[0\]\.input_dropout_ratio must be in \[0, 1\); got -0.1"),
        (model(channel(extra="attn_num_layers: 0")), r"hstu\[0\]\.attn_num_layers must be a positive int; got 0"),
        (model(channel(stu_extra="scaling_seqlen: 0")), r"hstu\[0\]\.stu\.scaling_seqlen must be -1 \(batch max_seq_len\) or a positive int; got 0"),
        (model(channel(stu_extra="contextual_seq_len: -3")), r"hstu\[0\]\.stu\.contextual_seq_len must be >= 0 or -1.*; got -3"),
        (model(channel(stu_extra="contextual_seq_len: 2")),
         r"hstu\[0\]\.stu\.contextual_seq_len must be -1 or the preprocessor's contextual prefix \(0\); got 2"),
        (model(channel(extra="positional_encoder { num_position_buckets: 8 use_time_encoding: true }")),
         r"hstu\[0\]\.positional_encoder\.num_time_buckets must be > 0 when use_time_encoding is true; got 0"),
        (model(channel(extra='positional_encoder { num_position_buckets: 8 time_bucket_fn: "cube" }')),
         r"hstu\[0\]\.positional_encoder\.time_bucket_fn must be one of \['sqrt', 'log'\]; got 'cube'"),
        (model(channel(extra="input_preprocessor { contextual_preprocessor { hidden_dim: 4 max_contextual_seq_len: 2 } }"), extra="item_embedding_dim: 8"),
         r"contextual_preprocessor\.contextual_feature_dim must be > 0 when max_contextual_seq_len=2; got 0"),
        (model(channel(extra="input_preprocessor { contextual_preprocessor { hidden_dim: 4 } }")),
         r"item_embedding_dim must be > 0 \(input width of hstu\[0\]\.input_preprocessor\); got 0"),
        (model(channel(), extra="item_embedding_dim: 5"),
         r"item_embedding_dim must equal hstu\[0\]\.stu\.embedding_dim=8 when that channel has no input_preprocessor; got 5"),
        (model(channel(extra="output_postprocessor { timestamp_layernorm_postprocessor { time_duration_period_units: [60] } }")),
         r"time_duration_units_per_period must have as many entries as time_duration_period_units \(\[60\]\); got \[\]"),
        (model(channel(), extra='tasks { task_name: "a" } tasks { task_name: "a" }'), r"tasks\[1\]\.task_name must be non-empty and unique; got 'a'"),
    ],
)
def test_model_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(text)
    # Builders validate too (a message built in code never skips the checks).
    cfg = parse_config(text, validate=False)
    with pytest.raises(ConfigError, match=message):
        build_multi_channel(cfg)


def test_sla_kernel_rule_lives_in_one_function(monkeypatch):
    for kernel in ("PYTORCH", "TRITON", "CUTLASS", "AUTO", hstu_pb2.PYTORCH, hstu_pb2.TRITON):
        assert kernel_supports_sla(kernel)
    with pytest.raises(ConfigError, match="kernel must be one of"):
        kernel_supports_sla("FLASH")
    hstu = text_format.Parse(STU % "sla_k1: 2", hstu_pb2.HSTU())
    assert build_transducer(hstu, kernel="TRITON").stu_module.layers[0].kernel.value == "TRITON"
    # A kernel without SLA is refused by config validation and the builders alike.
    without_sla(monkeypatch, "TRITON")
    assert not kernel_supports_sla("TRITON")
    with pytest.raises(ConfigError, match="kernel='TRITON' cannot run Semi-Local Attention"):
        build_transducer(hstu, kernel="TRITON")
    assert build_transducer(hstu, kernel="CUTLASS").stu_module.layers[0].kernel.value == "CUTLASS"


def without_sla(monkeypatch, name: str) -> None:
    """The backend table with ``name``'s row declaring no SLA."""
    row = backends.BACKENDS[name]
    caps = dataclasses.replace(row.capabilities, sla=False)
    monkeypatch.setitem(backends.BACKENDS, name, dataclasses.replace(row, capabilities=caps))


def test_kernel_override_is_validated_too(monkeypatch):
    without_sla(monkeypatch, "TRITON")
    cfg = parse_config(model(channel(stu_extra="sla_k1: 2")))
    with pytest.raises(ConfigError, match="kernel='TRITON' cannot run Semi-Local Attention"):
        build_multi_channel(cfg, kernel="TRITON")
    # AUTO lacks nothing: it takes the first backend that can (PYTORCH runs everything).
    parse_config(model(channel(stu_extra="sla_k1: 2"), extra="kernel: AUTO"))


def test_config_validation_asks_the_backend_table():
    # CUTLASS declares equal q/k and v head dims; the refusal names the capability and the path.
    text = model("hstu { stu { embedding_dim: 8 num_heads: 2 hidden_dim: 8 attention_dim: 4 } }", extra="kernel: CUTLASS")
    with pytest.raises(ConfigError, match=r"kernel='CUTLASS' cannot run different q/k and v head dims .*hstu\[0\]\.stu"):
        parse_config(text)
    parse_config(text.replace("kernel: CUTLASS", "kernel: TRITON"))


def test_hstu_and_stu_messages_validate_standalone():
    with pytest.raises(ConfigError, match=r"^<string>: stu\.num_heads must be a positive int; got 0$"):
        parse_config("embedding_dim: 8 num_heads: 0 hidden_dim: 4 attention_dim: 4", hstu_pb2.STU)
    with pytest.raises(ConfigError, match=r"hstu\.attn_truncation_split_layer must be in \(0, attn_num_layers=2\); got 2"):
        parse_config(STU % "" + " attn_num_layers: 2 attn_truncation_split_layer: 2 attn_truncation_tail_len: 1", hstu_pb2.HSTU)
    with pytest.raises(ConfigError, match="input width must equal hstu.stu.embedding_dim=8; got input_embedding_dim=16"):
        build_transducer(parse_config(STU % "", hstu_pb2.HSTU), input_embedding_dim=16)


def test_module_level_channel_name_errors():
    def transducer() -> HSTUTransducer:
        return HSTUTransducer(STUStack([STULayer(8, 2, 4, 4)]))

    with pytest.raises(ValueError, match=r"channel names must be unique; channels\[1\] repeats 'a'"):
        MultiChannelHSTU([("a", transducer()), ("a", transducer())])
    with pytest.raises(ValueError, match=r"channel names must be non-empty with 2 channels; channels\[0\] has name ''"):
        MultiChannelHSTU([("", transducer()), ("b", transducer())])
    with pytest.raises(ValueError, match="candidate_feature_name 'x' must differ"):
        MultiChannelHSTU([("x", transducer())], candidate_feature_name="x")
    with pytest.raises(ValueError, match="at least one"):
        MultiChannelHSTU([])
    single = MultiChannelHSTU([("", transducer())])
    assert single.channel_names == ["uih"]


@pytest.mark.parametrize(
    "field,value",
    [("num_heads", 0), ("attention_dim", 0), ("output_dropout_ratio", 1.5), ("contextual_seq_len", -3),
     ("attn_alpha", -0.5), ("scaling_seqlen", 0), ("fp8_quant_mode", 9), ("uvqk_activation", "silu")],
)
def test_config_and_layer_config_say_the_same_rule(field, value):
    """One rule, two callers: the layer config's ValueError and config validation's ConfigError
    (which adds the field's path) carry the same text."""
    from torchrec_hstu.config.kwargs import config_to_kwargs
    from torchrec_hstu.config.validation import validate_stu
    from torchrec_hstu.modules.stu import STULayerConfig

    message = text_format.Parse((STU % "")[len("stu {"):-1], hstu_pb2.STU())
    setattr(message, field, value)
    with pytest.raises(ConfigError) as from_config:
        validate_stu(message, path="stu")
    good = config_to_kwargs(text_format.Parse((STU % "")[len("stu {"):-1], hstu_pb2.STU()))
    with pytest.raises(ValueError) as from_layer:
        STULayerConfig(**{**good, field: value})
    assert str(from_config.value) == f"stu.{from_layer.value}"
