"""config_to_kwargs: set values, declared defaults, sentinels, nesting, oneofs, lists, enums."""

import pytest
from google.protobuf import json_format, struct_pb2, text_format

from torchrec_hstu.config import config_to_kwargs, hstu_pb2
from torchrec_hstu.config.kwargs import shortest_float32
from torchrec_hstu.modules import STULayer

STU_TEXT = "embedding_dim: 16 num_heads: 2 hidden_dim: 8 attention_dim: 4"


def _stu(extra: str = "") -> hstu_pb2.STU:
    return text_format.Parse(STU_TEXT + " " + extra, hstu_pb2.STU())


def test_unset_fields_give_declared_defaults_and_sentinels():
    kwargs = config_to_kwargs(_stu())
    assert kwargs == {
        "embedding_dim": 16, "num_heads": 2, "hidden_dim": 8, "attention_dim": 4,
        "output_dropout_ratio": 0.3, "max_attn_len": 0, "attn_alpha": 0.0, "use_group_norm": False,
        "recompute_normed_x": True, "recompute_uvqk": True, "recompute_y": True,
        "contextual_seq_len": -1, "sla_k1": 0, "sla_k2": 0, "scaling_seqlen": -1, "fp8_quant_mode": -1,
        "uvqk_activation": "u",
    }
    # Every field of the descriptor is present, in declaration order, except the deprecated
    # ones (TorchEasyRec's sort_by_length: parsed, reaches no constructor).
    assert list(kwargs) == [f.name for f in hstu_pb2.STU.DESCRIPTOR.fields if not f.GetOptions().deprecated]
    assert "sort_by_length" not in kwargs and hstu_pb2.STU.DESCRIPTOR.fields_by_name["sort_by_length"]


def test_fp8_minus_one_explicit_equals_unset():
    explicit, unset = _stu("fp8_quant_mode: -1"), _stu()
    assert explicit.HasField("fp8_quant_mode") and not unset.HasField("fp8_quant_mode")
    assert config_to_kwargs(explicit) == config_to_kwargs(unset)
    assert config_to_kwargs(_stu("fp8_quant_mode: 3"))["fp8_quant_mode"] == 3


def test_set_values_win_over_defaults():
    kwargs = config_to_kwargs(
        _stu("output_dropout_ratio: 0.1 contextual_seq_len: 0 scaling_seqlen: 512 "
             "recompute_y: false attn_alpha: 0.125 sla_k1: 7")
    )
    assert kwargs["output_dropout_ratio"] == 0.1  # shortest float32 repr, not 0.10000000149
    assert kwargs["contextual_seq_len"] == 0
    assert kwargs["scaling_seqlen"] == 512
    assert kwargs["recompute_y"] is False
    assert kwargs["attn_alpha"] == 0.125
    assert kwargs["sla_k1"] == 7


def test_agrees_with_message_to_dict_on_set_fields():
    """Independent check: MessageToDict prints exactly the set fields; ours has them with equal values."""
    model = text_format.Parse(
        """
        hstu { name: "a" stu { embedding_dim: 8 num_heads: 1 hidden_dim: 4 attention_dim: 4 sla_k2: 3 }
               positional_encoder { num_position_buckets: 9 use_time_encoding: true num_time_buckets: 3 }
               output_postprocessor { timestamp_layernorm_postprocessor {
                 time_duration_period_units: [60, 3600] time_duration_units_per_period: [60, 24] } } }
        kernel: CUTLASS num_items: 12345678901 tasks { task_name: "click" task_bitmask: 1 }
        """,
        hstu_pb2.HSTUModel(),
    )
    printed = json_format.MessageToDict(model, preserving_proto_field_name=True)
    ours = config_to_kwargs(model)

    def contained(small, big, path="root"):
        if isinstance(small, dict):
            for key, value in small.items():
                assert key in big, f"{path}.{key}"
                contained(value, big[key], f"{path}.{key}")
        elif isinstance(small, list):
            assert len(small) == len(big), path
            for i, (a, b) in enumerate(zip(small, big)):
                contained(a, b, f"{path}[{i}]")
        elif isinstance(small, str) and isinstance(big, int):
            assert int(small) == big, path  # MessageToDict prints 64-bit ints as strings
        else:
            assert small == big, path

    contained(printed, ours)
    assert ours["num_items"] == 12345678901 and isinstance(ours["num_items"], int)
    assert ours["kernel"] == "CUTLASS"
    assert ours["tasks"] == [{"task_name": "click", "task_bitmask": 1, "weight": 1.0}]


def test_nested_messages_oneofs_and_unset_submessages():
    hstu = text_format.Parse(
        f"stu {{ {STU_TEXT} }} output_postprocessor {{ l2norm_postprocessor {{}} }}", hstu_pb2.HSTU()
    )
    kwargs = config_to_kwargs(hstu)
    assert isinstance(kwargs["stu"], dict) and kwargs["stu"]["num_heads"] == 2
    # oneof: only the chosen member, as {member: kwargs}; an empty chosen message gives its defaults.
    assert kwargs["output_postprocessor"] == {"l2norm_postprocessor": {"eps": 1e-6}}
    # unset sub-messages: key present, value None.
    assert kwargs["positional_encoder"] is None and kwargs["input_preprocessor"] is None
    # a set oneof container with nothing chosen: no member key at all.
    assert config_to_kwargs(hstu_pb2.OutputPostprocessor()) == {}
    hstu.output_postprocessor.layernorm_postprocessor.eps = 1e-3
    assert config_to_kwargs(hstu)["output_postprocessor"] == {"layernorm_postprocessor": {"eps": 1e-3}}


def test_repeated_and_map_fields():
    pre = hstu_pb2.ContextualPreprocessor(hidden_dim=4, action_weights=[1, 2, 64])
    assert config_to_kwargs(pre)["action_weights"] == [1, 2, 64]
    assert config_to_kwargs(hstu_pb2.ContextualPreprocessor(hidden_dim=4))["action_weights"] == []
    model = hstu_pb2.HSTUModel()
    model.hstu.add().name = "x"
    model.hstu.add().name = "y"
    assert [c["name"] for c in config_to_kwargs(model)["hstu"]] == ["x", "y"]
    # map<string, Value> (Value is a oneof) from the well-known Struct type.
    struct = struct_pb2.Struct()
    struct.update({"a": 1.5, "b": "text"})
    assert config_to_kwargs(struct) == {"fields": {"a": {"number_value": 1.5}, "b": {"string_value": "text"}}}


def test_stu_layer_from_kwargs_directly():
    stu = _stu("use_group_norm: true sla_k1: 4 sla_k2: 2 fp8_quant_mode: 2 output_dropout_ratio: 0.0")
    layer = STULayer(**config_to_kwargs(stu))
    opts = layer.attention_options
    assert (opts.sla_k1, opts.sla_k2, opts.fp8_quant_mode, opts.contextual_seq_len) == (4, 2, 2, 0)
    assert layer.config.use_group_norm and layer.output_norm_weight.shape == (2,)


@pytest.mark.parametrize("value", [0.3, 0.1, 0.2, 1e-6, 60.0, 0.125, 3.4e38, 1.17549435e-38])
def test_shortest_float32_round_trips(value):
    import struct as _struct

    f32 = _struct.unpack("<f", _struct.pack("<f", value))[0]
    short = shortest_float32(f32)
    assert _struct.pack("<f", short) == _struct.pack("<f", f32)
    assert len(repr(short)) <= len(repr(f32))


def test_rejects_non_messages():
    with pytest.raises(TypeError, match="protobuf message"):
        config_to_kwargs({"embedding_dim": 1})
