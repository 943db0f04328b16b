"""MultiChannelHSTU (Mixture of Transducers): routing, concatenation, shared / separate tables."""

from typing import Dict, List

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_hstu.config import build_multi_channel, parse_config
from torchrec_hstu.modules import MultiChannelHSTU

D = 8

TWO_CHANNELS = """
item_embedding_dim: 8
candidate_feature_name: "cands"
hstu { name: "clicks"
  stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 output_dropout_ratio: 0 }
  attn_num_layers: 2 input_dropout_ratio: 0
  positional_encoder { num_position_buckets: 32 num_time_buckets: 8 use_time_encoding: true }
  input_preprocessor { contextual_preprocessor { hidden_dim: 8 action_embedding_dim: 2 action_weights: [1, 2]
                       contextual_feature_dim: 3 max_contextual_seq_len: 2 } }
  output_postprocessor { timestamp_layernorm_postprocessor { time_duration_period_units: [3600] time_duration_units_per_period: [24] } } }
hstu { name: "views"
  stu { embedding_dim: 12 num_heads: 3 hidden_dim: 4 attention_dim: 4 output_dropout_ratio: 0 sla_k1: 2 sla_k2: 1 }
  attn_num_layers: 3 input_dropout_ratio: 0 attn_truncation_split_layer: 1 attn_truncation_tail_len: 2
  input_preprocessor { contextual_preprocessor { hidden_dim: 8 } }
  output_postprocessor { layernorm_postprocessor {} } }
"""


def _jagged(rows: List[torch.Tensor]) -> JaggedTensor:
    lengths = torch.tensor([r.shape[0] for r in rows])
    return JaggedTensor(values=torch.cat(rows) if rows else torch.zeros(0), lengths=lengths)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hist_lengths = {"clicks": [3, 0, 5, 1], "views": [4, 2, 0, 6]}
    cand_lengths = [2, 1, 3, 0]
    hist = {k: [torch.randn(n, D, generator=g) for n in v] for k, v in hist_lengths.items()}
    cands = [torch.randn(n, D, generator=g) for n in cand_lengths]
    hist_ts = {k: [torch.sort(torch.randint(0, 10**6, (n,), generator=g).double())[0] for n in v]
               for k, v in hist_lengths.items()}
    cand_ts = [torch.full((n,), 2e6, dtype=torch.float64) for n in cand_lengths]
    acts = {k: [torch.randint(0, 4, (n,), generator=g) for n in v] for k, v in hist_lengths.items()}
    ctx = torch.randn(4, 2, 3, generator=g)
    return hist, cands, hist_ts, cand_ts, acts, ctx


def test_each_channel_sees_its_history_then_the_shared_candidates():
    """Oracle: each transducer run alone on per-request [history | candidates] built by hand."""
    torch.manual_seed(0)
    mot = build_multi_channel(parse_config(TWO_CHANNELS)).eval()
    hist, cands, hist_ts, cand_ts, acts, ctx = _batch()
    emb = {k: _jagged(v) for k, v in hist.items()}
    emb["cands"] = _jagged(cands)
    stamps = {k: _jagged(v) for k, v in hist_ts.items()}
    stamps["cands"] = _jagged(cand_ts)
    actions = {k: _jagged(v) for k, v in acts.items()}
    with torch.no_grad():
        out = mot(emb, seq_timestamps=stamps, seq_actions=actions, contextual_embeddings=ctx)
    num_targets = torch.tensor([c.shape[0] for c in cands])
    expected = []
    for name in ("clicks", "views"):
        seqs = [torch.cat([h, c]) for h, c in zip(hist[name], cands)]
        ts = torch.cat([torch.cat([h, c]) for h, c in zip(hist_ts[name], cand_ts)])
        # Candidate actions are never visible (the module pads zeros; 3 here must not matter).
        act = torch.cat([torch.cat([a, torch.full((c.shape[0],), 3)]) for a, c in zip(acts[name], cands)])
        with torch.no_grad():
            alone = mot.channel(name)(_jagged(seqs), seq_timestamps=ts, num_targets=num_targets,
                                      contextual_embeddings=ctx, seq_actions=act)
        got = out.channel_embeddings[name]
        torch.testing.assert_close(got.values(), alone.candidate_embeddings.values())
        assert got.lengths().tolist() == num_targets.tolist()
        expected.append(alone.candidate_embeddings.values())
    merged = out.candidate_embeddings
    assert merged.values().shape == (6, 8 + 12) and mot.output_dim == 20
    torch.testing.assert_close(merged.values(), torch.cat(expected, dim=-1))
    assert merged.lengths().tolist() == [2, 1, 3, 0]
    # A channel's output depends on its own history only.
    emb2 = dict(emb)
    emb2["views"] = _jagged([h + 1.0 for h in hist["views"]])
    with torch.no_grad():
        out2 = mot(emb2, seq_timestamps=stamps, seq_actions=actions, contextual_embeddings=ctx)
    torch.testing.assert_close(out2.channel_embeddings["clicks"].values(), out.channel_embeddings["clicks"].values())
    assert not torch.allclose(out2.channel_embeddings["views"].values(), out.channel_embeddings["views"].values())


def _ids(lengths: Dict[str, List[int]], vocab: int, seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys = list(lengths)
    all_lengths = torch.tensor([n for k in keys for n in lengths[k]])
    values = torch.randint(0, vocab, (int(all_lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=all_lengths)


SIMPLE = """
item_embedding_dim: 8
hstu { name: "clicks" stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 output_dropout_ratio: 0 }
       attn_num_layers: 1 input_dropout_ratio: 0 }
hstu { name: "views" stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 output_dropout_ratio: 0 }
       attn_num_layers: 1 input_dropout_ratio: 0 }
"""


@pytest.mark.parametrize("shared", [True, False])
def test_shared_or_separate_embedding_tables(shared):
    """Channels sharing one table (one EmbeddingConfig, three features) or each with its own."""
    features = ["clicks", "views", "candidates"]
    if shared:
        tables = [EmbeddingConfig(name="video_id", embedding_dim=D, num_embeddings=50, feature_names=features)]
    else:
        tables = [EmbeddingConfig(name=f"{f}_table", embedding_dim=D, num_embeddings=50, feature_names=[f])
                  for f in features]
    torch.manual_seed(0)
    ec = EmbeddingCollection(tables=tables, device=torch.device("cpu"))
    mot = build_multi_channel(parse_config(SIMPLE))
    kjt = _ids({"clicks": [3, 1, 0], "views": [2, 0, 4], "candidates": [1, 2, 2]}, 50, seed=1)
    out = mot(ec(kjt))
    assert out.candidate_embeddings.values().shape == (5, 16)
    # (Outputs are L2-normalized, so a random projection, not the squared norm, as the loss.)
    (out.candidate_embeddings.values() * torch.randn(5, 16)).sum().backward()
    weights = {name: p for name, p in ec.named_parameters()}
    assert len(weights) == len(tables)
    for weight in weights.values():
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    if shared:
        # One table: rows used by both histories and the candidates all receive gradient.
        grad = next(iter(weights.values())).grad
        used = set(kjt.values().tolist())
        assert {i for i in range(50) if grad[i].abs().sum() > 0} == used


def test_input_contract_errors():
    mot = build_multi_channel(parse_config(SIMPLE))
    h = JaggedTensor(values=torch.randn(3, D), lengths=torch.tensor([1, 2]))
    c = JaggedTensor(values=torch.randn(2, D), lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"seq_embeddings has no key 'views' \(needed by channel 'views'\)"):
        mot({"clicks": h, "candidates": c})
    with pytest.raises(ValueError, match=r"seq_embeddings has no key 'candidates'"):
        mot({"clicks": h, "views": h})
    c3 = JaggedTensor(values=torch.randn(3, D), lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"seq_embeddings\['clicks'\] has 2 sequences but seq_embeddings\['candidates'\] has 3"):
        mot({"clicks": h, "views": h, "candidates": c3})
    with pytest.raises(ValueError, match="seq_timestamps has channel 'clicks' but not the candidates' key 'candidates'"):
        mot({"clicks": h, "views": h, "candidates": c}, seq_timestamps={"clicks": torch.zeros(3)})
    bounded = build_multi_channel(parse_config(SIMPLE + " max_seq_len: 3"))
    with pytest.raises(ValueError, match=r"channel 'clicks': a sequence has 4 tokens .* more than max_seq_len=3"):
        bounded({"clicks": JaggedTensor(values=torch.randn(3, D), lengths=torch.tensor([0, 3])),
                 "views": h, "candidates": c})


def test_single_unnamed_channel_reads_uih():
    cfg = parse_config("hstu { stu { embedding_dim: 8 num_heads: 2 hidden_dim: 4 attention_dim: 4 } attn_num_layers: 1 }")
    mot = build_multi_channel(cfg).eval()
    assert isinstance(mot, MultiChannelHSTU) and mot.channel_names == ["uih"]
    out = mot({"uih": JaggedTensor(values=torch.randn(3, D), lengths=torch.tensor([3])),
               "candidates": JaggedTensor(values=torch.randn(2, D), lengths=torch.tensor([2]))})
    assert out.candidate_embeddings.values().shape == (2, 8)
