"""models/build.py: config + checkpoint -> model; a checkpoint that does not fit names the field."""

import os

import pytest
import torch

from torchrec_hstu.cli import UserError
from torchrec_hstu.config import load_config, parse_config
from torchrec_hstu.models.build import build_model_from_config, load_checkpoint_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RETRIEVAL = """
item_embedding_dim: 16
max_seq_len: 16
num_gap_buckets: 4
hstu {
  stu { embedding_dim: 16 num_heads: 2 hidden_dim: 8 attention_dim: 8 output_dropout_ratio: 0.0 }
  attn_num_layers: 1
  positional_encoder { num_position_buckets: 17 num_time_buckets: 8 use_time_encoding: true }
}
"""


def _state(text: str):
    return build_model_from_config(parse_config(text), num_items=20).state_dict()


@pytest.mark.parametrize(
    "old,new,field",
    [
        ("num_heads: 2", "num_heads: 4", "hstu[0].stu.num_heads: the checkpoint has 4, the config 2"),
        ("attention_dim: 8", "attention_dim: 4", "hstu[0].stu.attention_dim: the checkpoint has 4, the config 8"),
        ("hidden_dim: 8", "hidden_dim: 16", "hstu[0].stu.hidden_dim: the checkpoint has 16, the config 8"),
        ("num_time_buckets: 8", "num_time_buckets: 12", "hstu[0].positional_encoder.num_time_buckets"),
        ("num_gap_buckets: 4", "num_gap_buckets: 6", "config field num_gap_buckets"),
        ("num_gap_buckets: 4", "num_gap_buckets: 0", "num_gap_buckets is 4"),
    ],
)
def test_checkpoint_of_another_model_names_the_config_field(old, new, field):
    state = _state(RETRIEVAL.replace(old, new))
    with pytest.raises(UserError) as info:
        build_model_from_config(parse_config(RETRIEVAL), state)
    assert field in str(info.value)


def test_ranking_widths_are_config_fields():
    config = load_config(os.path.join(REPO, "examples", "configs", "ranking_two_channel.pbtxt"))
    config.item_mlp_hidden_dim, config.fusion_hidden_dim = 24, 20
    model = build_model_from_config(config, num_items=30)
    assert model.item_mlp[0].weight.shape[0] == 24 and model.fusion[0].weight.shape[0] == 20
    state = model.state_dict()
    config.item_mlp_hidden_dim = 128
    with pytest.raises(UserError, match="config field item_mlp_hidden_dim"):
        build_model_from_config(config, state)
    config.item_mlp_hidden_dim = 24
    rebuilt = build_model_from_config(config, state)
    for key, value in rebuilt.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_checkpoint_reader_prefixes_and_bad_files(tmp_path):
    state = _state(RETRIEVAL)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 2}, tmp_path / "ckpt.pt")
    assert load_checkpoint_state(str(tmp_path / "ckpt.pt")).keys() == state.keys()
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="empty.pt: not a readable torch checkpoint"):
        load_checkpoint_state(str(tmp_path / "empty.pt"))
    torch.save({"model": {"a": 1}}, tmp_path / "ints.pt")
    with pytest.raises(UserError, match="state dict"):
        load_checkpoint_state(str(tmp_path / "ints.pt"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint_state(str(tmp_path / "absent.pt"))
