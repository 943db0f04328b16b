"""Every config field reaches the module it configures; text config -> modules -> forward."""

import glob
import math
import os

import pytest
import torch
from google.protobuf import text_format
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.config import (
    build_multi_channel,
    build_transducer,
    config_to_kwargs,
    hstu_pb2,
    load_config,
    parse_config,
)
from torchrec_hstu.modules import (
    ContextualPreprocessor,
    HSTUPositionalEncoder,
    L2NormPostprocessor,
    LayerNormPostprocessor,
    MultiChannelHSTU,
    TimestampLayerNormPostprocessor,
)

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs")


def fields_of(message_type) -> set:
    return {f.name for f in message_type.DESCRIPTOR.fields}


def test_stu_fields_reach_every_layer():
    stu_text = """
      embedding_dim: 12 num_heads: 3 hidden_dim: 5 attention_dim: 7 output_dropout_ratio: 0.15
      max_attn_len: 9 attn_alpha: 0.25 use_group_norm: true recompute_normed_x: false
      recompute_uvqk: false recompute_y: false sort_by_length: false contextual_seq_len: 0
      sla_k1: 0 sla_k2: 0 scaling_seqlen: 77 uvqk_activation: "all" fp8_quant_mode: 4"""
    stu = text_format.Parse(stu_text, hstu_pb2.STU())
    covered = set()
    hstu = hstu_pb2.HSTU(stu=stu, attn_num_layers=2)
    transducer = build_transducer(hstu)
    for layer in transducer.stu_module.layers:
        cfg, opts = layer.config, layer.attention_options
        assert layer.uvqk_weight.shape == (12, (2 * 5 + 2 * 7) * 3); covered |= {"embedding_dim", "num_heads", "hidden_dim", "attention_dim"}
        assert layer.output_weight.shape == (3 * 5 * 3, 12)
        assert cfg.output_dropout_ratio == 0.15; covered.add("output_dropout_ratio")
        assert opts.max_attn_len == 9; covered.add("max_attn_len")
        assert cfg.alpha == 0.25; covered.add("attn_alpha")
        assert cfg.use_group_norm and layer.output_norm_weight.shape == (3,); covered.add("use_group_norm")
        assert (cfg.recompute_normed_x, cfg.recompute_uvqk, cfg.recompute_y) == (False, False, False)
        covered |= {"recompute_normed_x", "recompute_uvqk", "recompute_y"}
        assert not hasattr(cfg, "sort_by_length"); covered.add("sort_by_length")  # ignored (parsed only)
        assert opts.contextual_seq_len == 0; covered.add("contextual_seq_len")
        assert opts.scaling_seqlen == 77; covered.add("scaling_seqlen")
        assert opts.fp8_quant_mode == 4 and layer.fp8_quant_mode == 4; covered.add("fp8_quant_mode")
        assert cfg.uvqk_activation == "all"
        covered.add("uvqk_activation")
    # SLA (needs no window): a second config.
    sla = build_transducer(parse_config("stu { %s sla_k1: 6 sla_k2: 3 max_attn_len: 0 }" % stu_text.replace("max_attn_len: 9", "")
                                         .replace("sla_k1: 0 sla_k2: 0", ""), hstu_pb2.HSTU))
    for layer in sla.stu_module.layers:
        assert (layer.attention_options.sla_k1, layer.attention_options.sla_k2) == (6, 3)
    covered |= {"sla_k1", "sla_k2"}
    assert covered == fields_of(hstu_pb2.STU)


def test_stu_defaults_reach_layers():
    layer = build_transducer(parse_config("stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 16 }", hstu_pb2.HSTU)).stu_module.layers[0]
    assert layer.config.output_dropout_ratio == 0.3
    assert layer.config.alpha == 1 / math.sqrt(16)
    assert layer.attention_options.scaling_seqlen == -1  # batch max_seq_len at run time
    assert layer.attention_options.fp8_quant_mode == -1
    assert layer.config.uvqk_activation == "u"
    assert layer.config.recompute_y


def test_hstu_fields_reach_the_transducer():
    cfg = parse_config(
        """
        name: "clicks"
        stu { embedding_dim: 16 num_heads: 2 hidden_dim: 4 attention_dim: 4 }
        input_dropout_ratio: 0.35 attn_num_layers: 4
        attn_truncation_split_layer: 3 attn_truncation_tail_len: 11
        positional_encoder { num_position_buckets: 33 }
        input_preprocessor { contextual_preprocessor { hidden_dim: 6 } }
        output_postprocessor { layernorm_postprocessor {} }
        """,
        hstu_pb2.HSTU,
    )
    t = build_transducer(cfg, input_embedding_dim=10)
    covered = set()
    assert len(t.stu_module.layers) == 4; covered.add("attn_num_layers")
    assert t.input_dropout.p == pytest.approx(0.35); covered.add("input_dropout_ratio")
    assert t.stu_module.attn_truncation_split_layer == 3; covered.add("attn_truncation_split_layer")
    assert t.stu_module.attn_truncation_tail_len == 11; covered.add("attn_truncation_tail_len")
    assert t.feature_name == "clicks"; covered.add("name")
    assert isinstance(t.positional_encoder, HSTUPositionalEncoder); covered.add("positional_encoder")
    assert isinstance(t.input_preprocessor, ContextualPreprocessor); covered.add("input_preprocessor")
    assert isinstance(t.output_postprocessor, LayerNormPostprocessor); covered.add("output_postprocessor")
    assert t.stu_module.layers[0].config.embedding_dim == 16; covered.add("stu")
    assert covered == fields_of(hstu_pb2.HSTU)
    # Unset sub-modules: none, and the transducer's default postprocessor.
    bare = build_transducer(parse_config("stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 }", hstu_pb2.HSTU))
    assert bare.positional_encoder is None and bare.input_preprocessor is None
    assert isinstance(bare.output_postprocessor, L2NormPostprocessor) and bare.feature_name is None
    assert bare.input_dropout.p == pytest.approx(0.2) and len(bare.stu_module.layers) == 3


def test_positional_encoder_fields():
    cfg = parse_config(
        """
        stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 }
        positional_encoder { num_position_buckets: 17 num_time_buckets: 5 use_time_encoding: true
                             time_bucket_fn: "log" time_bucket_increments: 3600 }
        input_preprocessor { contextual_preprocessor { hidden_dim: 4 contextual_feature_dim: 3 max_contextual_seq_len: 2 } }
        """,
        hstu_pb2.HSTU,
    )
    pe = build_transducer(cfg, input_embedding_dim=6).positional_encoder
    assert pe.position_embeddings.shape == (17, 8)
    assert pe.timestamp_embeddings.shape == (6, 8)
    assert pe.use_time_encoding is True and pe.time_bucket_fn == "log"
    assert pe.time_bucket_increments == 3600.0
    assert pe.contextual_seq_len == 2  # the preprocessor's prefix
    assert set(config_to_kwargs(cfg.positional_encoder)) == fields_of(hstu_pb2.PositionalEncoder)


def test_preprocessor_fields_and_contextual_sentinel():
    cfg = parse_config(
        """
        stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 }
        input_preprocessor { contextual_preprocessor {
          hidden_dim: 10 contextual_feature_dim: 3 max_contextual_seq_len: 2
          action_embedding_dim: 5 action_weights: [1, 4, 16] action_hidden_dim: 7 } }
        """,
        hstu_pb2.HSTU,
    )
    t = build_transducer(cfg, input_embedding_dim=6)
    pre = t.input_preprocessor
    assert pre.content_mlp[0].in_features == 6 and pre.content_mlp[0].out_features == 10
    assert pre.content_mlp[2].out_features == 8
    assert pre.contextual_weight.shape == (2, 3, 8) and pre.contextual_seq_len() == 2
    assert pre.action_encoder.action_embeddings.shape == (3, 5)
    assert pre.action_encoder.action_weights.tolist() == [1, 4, 16]
    assert pre.action_mlp[0].out_features == 7
    assert set(config_to_kwargs(cfg.input_preprocessor.contextual_preprocessor)) == fields_of(hstu_pb2.ContextualPreprocessor)
    # contextual_seq_len = -1 resolved to the preprocessor's prefix on every layer.
    assert all(layer.attention_options.contextual_seq_len == 2 for layer in t.stu_module.layers)
    assert t.contextual_seq_len == 2


def test_postprocessor_fields():
    base = "stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 } output_postprocessor { %s }"
    l2 = build_transducer(parse_config(base % "l2norm_postprocessor { eps: 0.01 }", hstu_pb2.HSTU)).output_postprocessor
    assert isinstance(l2, L2NormPostprocessor) and l2.eps == 0.01
    ln = build_transducer(parse_config(base % "layernorm_postprocessor { eps: 0.002 }", hstu_pb2.HSTU)).output_postprocessor
    assert isinstance(ln, LayerNormPostprocessor) and ln.norm.eps == 0.002 and ln.norm.normalized_shape == (8,)
    ts = build_transducer(parse_config(
        base % "timestamp_layernorm_postprocessor { time_duration_period_units: [3600, 86400] "
               "time_duration_units_per_period: [24, 7] eps: 0.003 }", hstu_pb2.HSTU)).output_postprocessor
    assert isinstance(ts, TimestampLayerNormPostprocessor)
    assert ts.period_units.tolist() == [3600, 86400] and ts.units_per_period.tolist() == [24, 7]
    assert ts.norm.eps == 0.003 and ts.linear.in_features == 8 + 4
    members = {f.name for f in hstu_pb2.OutputPostprocessor.DESCRIPTOR.fields}
    assert members == {"l2norm_postprocessor", "layernorm_postprocessor", "timestamp_layernorm_postprocessor"}


def test_model_fields_reach_the_multi_channel_module():
    cfg = parse_config(
        """
        item_embedding_dim: 6 max_seq_len: 40 kernel: CUTLASS candidate_feature_name: "cands" num_items: 99
        tasks { task_name: "click" task_bitmask: 1 weight: 2 }
        hstu { name: "a" stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 fp8_quant_mode: 2 }
               input_preprocessor { contextual_preprocessor { hidden_dim: 4 } } }
        hstu { name: "b" stu { embedding_dim: 12 num_heads: 2 hidden_dim: 4 attention_dim: 4 }
               attn_num_layers: 1 input_preprocessor { contextual_preprocessor { hidden_dim: 4 } } }
        """
    )
    mot = build_multi_channel(cfg)
    assert isinstance(mot, MultiChannelHSTU)
    assert mot.channel_names == ["a", "b"]
    assert mot.candidate_feature_name == "cands" and mot.max_seq_len == 40
    assert mot.output_dim == 8 + 12
    for channel in mot.channels:
        assert channel.input_preprocessor.content_mlp[0].in_features == 6
        assert all(layer.kernel.value == "CUTLASS" for layer in channel.stu_module.layers)
    # Per-channel fp8_quant_mode reaches each channel's layers (and only them).
    assert [l.attention_options.fp8_quant_mode for l in mot.channel("a").stu_module.layers] == [2, 2, 2]
    assert [l.attention_options.fp8_quant_mode for l in mot.channel("b").stu_module.layers] == [-1]
    # Kernel override (e.g. for a CPU box) reaches every layer; the message is not modified.
    assert all(l.kernel.value == "PYTORCH" for c in build_multi_channel(cfg, kernel="PYTORCH").channels for l in c.stu_module.layers)
    assert cfg.kernel == hstu_pb2.CUTLASS
    # Fields the modules don't consume (data / head side) are readable as kwargs.
    kwargs = config_to_kwargs(cfg)
    assert kwargs["num_items"] == 99 and kwargs["tasks"] == [{"task_name": "click", "task_bitmask": 1, "weight": 2.0}]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.pbtxt"))))
def test_example_configs_load_and_round_trip_through_text(path):
    cfg = load_config(path)
    again = parse_config(text_format.MessageToString(cfg), source="round-trip")
    assert again == cfg and config_to_kwargs(again) == config_to_kwargs(cfg)


def test_example_config_set():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.pbtxt"))}
    assert {"retrieval_small.pbtxt", "ranking_two_channel.pbtxt", "ultra_hstu.pbtxt"} <= names


def test_retrieval_config_text_to_forward():
    cfg = load_config(os.path.join(CONFIG_DIR, "retrieval_small.pbtxt"))
    assert len(cfg.hstu) == 1
    torch.manual_seed(0)
    t = build_transducer(cfg.hstu[0], input_embedding_dim=cfg.item_embedding_dim, kernel=cfg.kernel,
                         return_full_embeddings=True).eval()
    lengths = torch.tensor([5, 1, 0, 9])
    jt = JaggedTensor(values=torch.randn(int(lengths.sum()), 64), lengths=lengths)
    ts = torch.cat([torch.arange(n) * 3600.0 for n in lengths.tolist()])
    out = t(jt, seq_timestamps=ts)
    full = out.full_embeddings.values()
    assert full.shape == (15, 64)
    assert torch.allclose(full.norm(dim=-1), torch.ones(15, dtype=full.dtype), atol=1e-5)  # l2norm
    # Causality: changing the last token of sequence 0 leaves its earlier outputs unchanged.
    values2 = jt.values().clone()
    values2[4] += 1.0
    out2 = t(JaggedTensor(values=values2, lengths=lengths), seq_timestamps=ts)
    assert torch.allclose(out2.full_embeddings.values()[:4], full[:4], atol=1e-6)
    assert not torch.allclose(out2.full_embeddings.values()[4], full[4], atol=1e-4)


def test_ranking_config_text_to_forward():
    cfg = load_config(os.path.join(CONFIG_DIR, "ranking_two_channel.pbtxt"))
    torch.manual_seed(0)
    mot = build_multi_channel(cfg).eval()
    d = cfg.item_embedding_dim
    hist = {"clicks": torch.tensor([3, 0, 5]), "views": torch.tensor([2, 4, 1])}
    cands = torch.tensor([2, 1, 3])
    emb = {k: JaggedTensor(values=torch.randn(int(v.sum()), d), lengths=v) for k, v in hist.items()}
    emb["candidates"] = JaggedTensor(values=torch.randn(int(cands.sum()), d), lengths=cands)
    stamps = {k: JaggedTensor(values=torch.arange(int(v.lengths().sum())).float() * 60.0, lengths=v.lengths())
              for k, v in emb.items()}
    stamps["candidates"] = JaggedTensor(values=torch.full((int(cands.sum()),), 1e5), lengths=cands)
    actions = {k: JaggedTensor(values=torch.randint(0, 4, (int(v.sum()),)), lengths=v) for k, v in hist.items()}
    out = mot(emb, seq_timestamps=stamps, seq_actions=actions)
    assert out.candidate_embeddings.values().shape == (6, 128)
    assert out.candidate_embeddings.lengths().tolist() == [2, 1, 3]
    assert torch.isfinite(out.candidate_embeddings.values()).all()


def test_build_retrieval_transducer_from_path_with_kernel_override():
    from torchrec_hstu.config import ConfigError, build_retrieval_transducer

    path = os.path.join(CONFIG_DIR, "retrieval_small.pbtxt")
    transducer, width = build_retrieval_transducer(path, kernel="pytorch")
    assert width == 64 and transducer.return_full_embeddings
    assert all(layer.kernel.value == "PYTORCH" for layer in transducer.stu_module.layers)
    auto, _ = build_retrieval_transducer(load_config(path))
    assert all(layer.kernel.value == "AUTO" for layer in auto.stu_module.layers)  # the config's kernel
    with pytest.raises(ConfigError, match="exactly one channel for retrieval; got 2"):
        build_retrieval_transducer(os.path.join(CONFIG_DIR, "ranking_two_channel.pbtxt"))
