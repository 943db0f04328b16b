"""The modules' edge checks: facts computed once equal the per-call ones, outputs do not depend on
who ran the check, and wrong inputs or facts are refused with ``ValueError``."""

import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from tests.modules.sync_cases import stack_case, transducer_case, two_channel_case
from torchrec_hstu.modules import HSTUTransducer, MultiChannelHSTU, STULayer, STUStack
from torchrec_hstu.ops.common import JaggedBatchFacts

CPU = torch.device("cpu")


def _transducer(**kwargs) -> HSTUTransducer:
    torch.manual_seed(0)
    return HSTUTransducer(STUStack([STULayer(8, 2, 4, 4, output_dropout_ratio=0.0)]), **kwargs).eval()


@pytest.mark.parametrize("make_case", [stack_case, transducer_case, two_channel_case], ids=lambda m: m.__name__)
def test_given_facts_give_the_same_step(make_case):
    case = make_case(CPU, "PYTORCH")
    case.model.eval()
    torch.manual_seed(1)
    loss_checked_inside = case.step(None)
    grads_inside = [p.grad.clone() for p in case.model.parameters() if p.grad is not None]
    case.model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss_with_facts = case.step(case.edge())
    grads_facts = [p.grad for p in case.model.parameters() if p.grad is not None]
    torch.testing.assert_close(loss_with_facts, loss_checked_inside)
    for a, b in zip(grads_facts, grads_inside):
        torch.testing.assert_close(a, b)


def test_transducer_check_batch_sync_and_wrong_facts():
    model = _transducer()
    jt = JaggedTensor(values=torch.randn(7, 8), lengths=torch.tensor([3, 4]))
    targets = torch.tensor([1, 2])
    facts = model.check_batch_sync(jt, num_targets=targets)
    assert facts == JaggedBatchFacts(lengths=(3, 4), num_targets=(1, 2), max_seq_len=4)
    with pytest.raises(ValueError, match="batch_facts describe 2 sequences, 7 tokens, num_targets"):
        model(jt, batch_facts=facts)  # facts with targets, call without
    with pytest.raises(ValueError, match="batch_facts describe"):
        model(jt, num_targets=targets, batch_facts=JaggedBatchFacts((3, 3), (1, 2), 3))
    with pytest.raises(ValueError, match="max_seq_len=3 is smaller than the longest sequence"):
        model(jt, num_targets=targets, max_seq_len=3, batch_facts=facts)
    with pytest.raises(ValueError, match="num_targets must be in"):
        model(jt, num_targets=torch.tensor([4, 0]))


def test_stack_and_layer_alone_check_their_inputs():
    stack = STUStack([STULayer(8, 2, 4, 4) for _ in range(2)])
    x, offsets = torch.randn(5, 8), torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="max_seq_len=2 is smaller"):
        stack(x, offsets, 2)
    with pytest.raises(ValueError, match="seq_offsets must be non-decreasing"):
        stack(x, torch.tensor([0, 3, 2]), 5)
    with pytest.raises(ValueError, match="max_seq_len=2 is smaller"):
        stack.layers[0](x, offsets, 2)


def test_multi_channel_check_batch_sync():
    def channel() -> HSTUTransducer:
        return HSTUTransducer(STUStack([STULayer(8, 2, 4, 4, output_dropout_ratio=0.0)]))

    model = MultiChannelHSTU([("clicks", channel()), ("views", channel())], max_seq_len=6)
    emb = {
        "clicks": JaggedTensor(values=torch.randn(3, 8), lengths=torch.tensor([1, 2])),
        "views": JaggedTensor(values=torch.randn(4, 8), lengths=torch.tensor([4, 0])),
        "candidates": JaggedTensor(values=torch.randn(3, 8), lengths=torch.tensor([2, 1])),
    }
    facts = model.check_batch_sync(emb)
    assert facts.channels["clicks"] == JaggedBatchFacts(lengths=(3, 3), num_targets=(2, 1), max_seq_len=3)
    assert facts.channels["views"] == JaggedBatchFacts(lengths=(6, 1), num_targets=(2, 1), max_seq_len=6)
    bad_rows = dict(emb, views=JaggedTensor(values=torch.randn(5, 8), lengths=torch.tensor([4, 0])))
    with pytest.raises(ValueError, match=r"seq_embeddings \['candidates', 'clicks', 'views'\] must be non-decr"):
        model(bad_rows)
    # One row too many in one key and one too few in another: the total matches, the keys do not.
    bad_rows["clicks"] = JaggedTensor(values=torch.randn(2, 8), lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"seq_embeddings\['clicks'\] has 2 rows but its lengths sum to 3"):
        model(bad_rows)
    too_long = dict(emb, views=JaggedTensor(values=torch.randn(5, 8), lengths=torch.tensor([5, 0])))
    with pytest.raises(ValueError, match="channel 'views': a sequence has 7 tokens"):
        model(too_long)
    negative = dict(emb, clicks=JaggedTensor(values=torch.randn(3, 8), lengths=torch.tensor([4, -1])))
    with pytest.raises(ValueError, match="must be non-decreasing"):
        model.check_batch_sync(negative)


def test_stack_uniform_takes_the_contextual_prefix():
    stu = dict(embedding_dim=8, num_heads=2, hidden_dim=4, attention_dim=4, contextual_seq_len=-1)
    stack = STUStack.uniform(stu, 3, contextual_seq_len=2, attn_truncation_split_layer=1, attn_truncation_tail_len=4)
    assert len(stack.layers) == 3 and stack.attn_truncation_tail_len == 4
    assert all(layer.attention_options.contextual_seq_len == 2 for layer in stack.layers)
    fixed = STUStack.uniform(dict(stu, contextual_seq_len=1), 1, contextual_seq_len=2)
    assert fixed.layers[0].attention_options.contextual_seq_len == 1
