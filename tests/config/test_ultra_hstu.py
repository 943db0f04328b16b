"""The anchor's ULTRA-HSTU shape from examples/configs/ultra_hstu.pbtxt builds and trains on CPU.

Dims are shrunk in the test; the structure is kept: 2 channels, group norm, SLA on every
layer, 4 layers with truncation before layer 2, contextual tokens, action encoder,
time encoding and the timestamp postprocessor, one shared item table.
"""

import os

import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_hstu.config import build_multi_channel, hstu_pb2, load_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs", "ultra_hstu.pbtxt")


def shrink(cfg: hstu_pb2.HSTUModel) -> hstu_pb2.HSTUModel:
    small = hstu_pb2.HSTUModel()
    small.CopyFrom(cfg)
    small.item_embedding_dim = 8
    small.max_seq_len = 64
    for ch in small.hstu:
        ch.stu.embedding_dim, ch.stu.num_heads, ch.stu.hidden_dim, ch.stu.attention_dim = 16, 2, 8, 8
        ch.stu.sla_k1, ch.stu.sla_k2 = 4, 2
        ch.attn_truncation_tail_len = 6
        ch.positional_encoder.num_position_buckets = 64
        ch.positional_encoder.num_time_buckets = 16
        pre = ch.input_preprocessor.contextual_preprocessor
        pre.hidden_dim, pre.action_hidden_dim, pre.contextual_feature_dim = 16, 16, 4
    return small


def test_ultra_config_is_the_anchor_shape():
    cfg = load_config(CONFIG)
    assert [c.name for c in cfg.hstu] == ["uih_click", "uih_view"]
    for ch in cfg.hstu:
        s = ch.stu
        assert (s.embedding_dim, s.num_heads, s.hidden_dim, s.attention_dim) == (512, 4, 128, 128)
        assert s.use_group_norm and (s.sla_k1, s.sla_k2) == (256, 32)
        assert ch.attn_num_layers == 4
        assert (ch.attn_truncation_split_layer, ch.attn_truncation_tail_len) == (2, 512)
    assert cfg.max_seq_len == 4096 and len(cfg.tasks) == 8


def test_ultra_shape_builds_and_trains_a_step_on_cpu():
    cfg = shrink(load_config(CONFIG))
    torch.manual_seed(0)
    model = build_multi_channel(cfg)
    # Structure survived the shrink.
    for name in ("uih_click", "uih_view"):
        stack = model.channel(name).stu_module
        assert len(stack.layers) == 4 and stack.attn_truncation_split_layer == 2
        assert stack.attn_truncation_tail_len == 6
        for layer in stack.layers:
            assert layer.config.use_group_norm and layer.attention_options.use_sla
            assert layer.attention_options.contextual_seq_len == 6
    vocab, b = 40, 3
    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name="video_id", embedding_dim=8, num_embeddings=vocab,
                                feature_names=["uih_click", "uih_view", "candidates"])],
        device=torch.device("cpu"),
    )
    head = torch.nn.Linear(model.output_dim, len(cfg.tasks))
    params = list(model.parameters()) + list(ec.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2)

    g = torch.Generator().manual_seed(0)
    lengths = {"uih_click": [9, 2, 0], "uih_view": [12, 0, 7], "candidates": [2, 3, 1]}
    keys = list(lengths)
    flat = torch.tensor([n for k in keys for n in lengths[k]])
    kjt = KeyedJaggedTensor(keys=keys, values=torch.randint(0, vocab, (int(flat.sum()),), generator=g), lengths=flat)
    stamps = {k: JaggedTensor(values=torch.sort(torch.randint(0, 10**6, (sum(v),), generator=g))[0].double(),
                              lengths=torch.tensor(v)) for k, v in lengths.items()}
    actions = {k: JaggedTensor(values=torch.randint(0, 256, (sum(lengths[k]),), generator=g),
                               lengths=torch.tensor(lengths[k])) for k in ("uih_click", "uih_view")}
    contextual = torch.randn(b, 6, 4, generator=g)
    labels = torch.randint(0, 256, (6,), generator=g)
    bits = torch.tensor([t.task_bitmask for t in cfg.tasks])
    targets = ((labels.unsqueeze(-1) & bits) > 0).float()  # [candidates, tasks]

    def loss_fn() -> torch.Tensor:
        out = model(ec(kjt), seq_timestamps=stamps, seq_actions=actions, contextual_embeddings=contextual)
        logits = head(out.candidate_embeddings.values())
        assert logits.shape == (6, 8)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = loss_fn()
    optimizer.zero_grad()
    loss.backward()
    for name in ("uih_click", "uih_view"):
        for i, layer in enumerate(model.channel(name).stu_module.layers):
            assert layer.uvqk_weight.grad is not None and layer.uvqk_weight.grad.abs().sum() > 0, (name, i)
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("channels.0.") for n in changed) and any(n.startswith("channels.1.") for n in changed)
    assert torch.isfinite(loss)
    # Two more steps on the same batch reduce the loss (eval mode: no dropout noise).
    model.eval()
    with torch.no_grad():
        start = loss_fn().item()
    for _ in range(2):
        optimizer.zero_grad()
        step_loss = loss_fn()
        step_loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert loss_fn().item() < start
