"""HSTUTransducer on torchrec types: composition, candidate split, truncation replay, training."""

import pytest
import torch
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.modules import (
    ContextualPreprocessor,
    HSTUPositionalEncoder,
    HSTUTransducer,
    L2NormPostprocessor,
    STULayer,
    STUStack,
    TimestampLayerNormPostprocessor,
)

D = 8


def make_transducer(c=0, split=0, tail=0, return_full=False, post=None, seed=0):
    torch.manual_seed(seed)
    pre = ContextualPreprocessor(6, D, 12, contextual_feature_dim=3 if c else 0, max_contextual_seq_len=c)
    layers = [
        STULayer(D, 2, 4, 4, output_dropout_ratio=0.0, contextual_seq_len=c) for _ in range(3 if split else 2)
    ]
    return HSTUTransducer(
        STUStack(layers, split, tail),
        input_preprocessor=pre,
        positional_encoder=HSTUPositionalEncoder(16, 32, D, contextual_seq_len=c),
        output_postprocessor=post,
        return_full_embeddings=return_full,
    ).eval()


def batch():
    lengths = torch.tensor([5, 1, 0, 4])
    num_targets = torch.tensor([2, 1, 0, 1])
    values = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    timestamps = torch.tensor([10, 70, 900, 5000, 5000, 30, 100, 200, 4000, 4100])
    return JaggedTensor(values=values, lengths=lengths), timestamps, num_targets


def by_hand(t: HSTUTransducer, jt, timestamps, num_targets, contextual=None):
    """Preprocess -> positional encoding -> stack -> strip the prefix -> postprocess, by hand."""
    lengths = jt.lengths()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    max_len = int(lengths.max())
    pre = t.input_preprocessor(jt.values(), offsets, max_len, timestamps, num_targets, contextual)
    x = t.positional_encoder(pre.seq_embeddings, pre.seq_offsets, pre.seq_timestamps, num_targets)
    out = t.stu_module(x, pre.seq_offsets, pre.max_seq_len, num_targets)
    c = t.contextual_seq_len
    rows, stamps, kept_ts = [], [], pre.seq_timestamps
    if out.truncation_plan is not None:
        kept_ts = out.truncation_plan.apply(kept_ts)
    new_offsets = out.x_offsets.tolist()
    for b in range(len(lengths)):
        start, end = new_offsets[b], new_offsets[b + 1]
        rows += list(range(start + c, end))
    full = t.output_postprocessor(out.x[rows], kept_ts[rows])
    full_lengths = [new_offsets[b + 1] - new_offsets[b] - c for b in range(len(lengths))]
    candidates, start = [], 0
    for n, k in zip(full_lengths, num_targets.tolist()):
        candidates += list(range(start + n - k, start + n))
        start += n
    return full, full_lengths, candidates, kept_ts[rows]


@pytest.mark.parametrize("c", [0, 2])
@pytest.mark.parametrize("return_full", [False, True])
def test_outputs_match_pipeline_by_hand(c, return_full):
    t = make_transducer(c=c, return_full=return_full,
                        post=TimestampLayerNormPostprocessor(D, [3600, 86400], [24, 7]))
    jt, ts, nt = batch()
    contextual = torch.randn(4, c, 3) if c else None
    out = t(jt, seq_timestamps=ts, num_targets=nt, contextual_embeddings=contextual)
    full, full_lengths, candidates, full_ts = by_hand(t, jt, ts, nt, contextual)
    assert full_lengths == jt.lengths().tolist()  # contextual prefix stripped
    torch.testing.assert_close(out.candidate_embeddings.values(), full[candidates])
    assert out.candidate_embeddings.lengths().tolist() == nt.tolist()
    if return_full:
        torch.testing.assert_close(out.full_embeddings.values(), full)
        assert out.full_embeddings.lengths().tolist() == full_lengths
        assert out.full_timestamps.tolist() == ts.tolist()
    else:
        assert out.full_embeddings is None


def test_truncation_replays_timestamps():
    t = make_transducer(c=1, split=2, tail=1, return_full=True)
    jt, ts, nt = batch()
    contextual = torch.randn(4, 1, 3)
    out = t(jt, seq_timestamps=ts, num_targets=nt, contextual_embeddings=contextual)
    full, full_lengths, candidates, full_ts = by_hand(t, jt, ts, nt, contextual)
    # Kept per sequence: last history token + targets: [1 + 2, 0 + 1, 0, 1 + 1].
    assert full_lengths == [3, 1, 0, 2] == out.full_embeddings.lengths().tolist()
    assert out.full_timestamps.tolist() == [900, 5000, 5000, 30, 4000, 4100] == full_ts.tolist()
    torch.testing.assert_close(out.full_embeddings.values(), full)
    torch.testing.assert_close(out.candidate_embeddings.values(), full[candidates])


def test_candidates_are_unit_norm_with_default_postprocessor():
    torch.manual_seed(0)
    t = HSTUTransducer(STUStack([STULayer(D, 2, 4, 4)]))
    assert isinstance(t.output_postprocessor, L2NormPostprocessor)
    out = t(JaggedTensor(values=torch.randn(6, D), lengths=torch.tensor([4, 2])), num_targets=torch.tensor([2, 1]))
    torch.testing.assert_close(out.candidate_embeddings.values().norm(dim=-1), torch.ones(3))
    empty = t(JaggedTensor(values=torch.randn(6, D), lengths=torch.tensor([4, 2])))
    assert empty.candidate_embeddings.values().shape == (0, D)  # num_targets None: no candidates


def test_dict_input_and_errors():
    t = HSTUTransducer(STUStack([STULayer(D, 2, 4, 4)]), feature_name="b")
    jt = JaggedTensor(values=torch.randn(3, D), lengths=torch.tensor([3]))
    assert t({"a": jt, "b": jt}, num_targets=torch.tensor([1])).candidate_embeddings.values().shape == (1, D)
    with pytest.raises(KeyError, match="feature_name 'b' not in the embeddings dict"):
        t({"a": jt}, num_targets=torch.tensor([1]))
    t.feature_name = None
    with pytest.raises(ValueError, match="set feature_name to pick one"):
        t({"a": jt, "b": jt})
    with pytest.raises(TypeError, match="JaggedTensor or Dict"):
        t(torch.randn(3, D))
    with pytest.raises(ValueError, match=r"without an input_preprocessor seq_embeddings must be \[L, 8\]"):
        t(JaggedTensor(values=torch.randn(3, 5), lengths=torch.tensor([3])))


def test_construction_errors():
    stack = STUStack([STULayer(D, 2, 4, 4, contextual_seq_len=0)])
    with pytest.raises(ValueError, match="differs from the preprocessor's contextual prefix 2"):
        HSTUTransducer(stack, input_preprocessor=ContextualPreprocessor(6, D, 12, 3, 2))
    with pytest.raises(ValueError, match="positional_encoder.contextual_seq_len=1 differs"):
        HSTUTransducer(stack, positional_encoder=HSTUPositionalEncoder(8, 8, D, contextual_seq_len=1))
    with pytest.raises(ValueError, match="output_embedding_dim=4 must equal the STU embedding_dim=8"):
        HSTUTransducer(stack, input_preprocessor=ContextualPreprocessor(6, 4, 12))
    with pytest.raises(ValueError, match=r"input_dropout_ratio must be in \[0, 1\)"):
        HSTUTransducer(stack, input_dropout_ratio=1.5)


def test_uniform_stack_takes_the_preprocessor_prefix():
    pre = ContextualPreprocessor(6, D, 12, contextual_feature_dim=3, max_contextual_seq_len=2)
    stu = dict(embedding_dim=D, num_heads=2, hidden_dim=4, attention_dim=4, contextual_seq_len=-1)
    t = HSTUTransducer(STUStack.uniform(stu, 3, pre.contextual_seq_len()), input_preprocessor=pre)
    assert len(t.stu_module.layers) == 3
    assert all(layer.attention_options.contextual_seq_len == 2 for layer in t.stu_module.layers)


def test_embedding_collection_training_moves_only_looked_up_rows():
    torch.manual_seed(0)
    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name="item_table", embedding_dim=D, num_embeddings=50, feature_names=["item_id"])],
        device=torch.device("cpu"),
    )
    transducer = HSTUTransducer(
        STUStack([STULayer(D, 2, 4, 4, output_dropout_ratio=0.0) for _ in range(2)]),
        positional_encoder=HSTUPositionalEncoder(16, 32, D),
    )
    head = torch.nn.Linear(D, 1)
    params = [*ec.parameters(), *transducer.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5)
    ids = torch.tensor([3, 17, 42, 7, 9, 5, 8, 17, 30])
    kjt = KeyedJaggedTensor(keys=["item_id"], values=ids, lengths=torch.tensor([5, 0, 4]))
    timestamps = torch.tensor([100, 200, 300, 400, 400, 50, 60, 90, 90])
    num_targets = torch.tensor([2, 0, 2])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    table = ec.embeddings["item_table"].weight
    before = table.detach().clone()
    losses = []
    for _ in range(5):
        out = transducer(ec(kjt), seq_timestamps=timestamps, num_targets=num_targets)
        logits = head(out.candidate_embeddings.values()).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = (table.detach() - before).abs().sum(1) > 0
    assert moved.nonzero().flatten().tolist() == sorted(set(ids.tolist()))


@pytest.mark.gpu
def test_gpu_transducer_matches_cpu():
    t = make_transducer(c=1, split=2, tail=2, return_full=True)
    jt, ts, nt = batch()
    contextual = torch.randn(4, 1, 3)
    cpu = t(jt, seq_timestamps=ts, num_targets=nt, contextual_embeddings=contextual)
    t = t.cuda()
    jt_gpu = JaggedTensor(values=jt.values().cuda(), lengths=jt.lengths().cuda())
    gpu = t(jt_gpu, seq_timestamps=ts.cuda(), num_targets=nt.cuda(), contextual_embeddings=contextual.cuda())
    torch.testing.assert_close(gpu.full_embeddings.values().cpu(), cpu.full_embeddings.values(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gpu.candidate_embeddings.values().cpu(), cpu.candidate_embeddings.values(), atol=1e-5, rtol=1e-4)
