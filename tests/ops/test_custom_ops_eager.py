"""The attention ops' two routes to one autograd (``register_attention_autograd``): plain eager
calls run the implementations through a ``torch.autograd.Function`` (no dispatcher); tracing,
dispatch modes and tensor subclasses go through the custom op. Both give the same values and
gradients, and compiled graphs still record the op."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.custom_ops import (
    ATTENTION_TENSORS,
    attention_output_fake,
    define_attention_op,
    eager_call_skips_dispatcher,
    register_attention_autograd,
)

CALLS = {"fwd": 0, "bwd": 0}


def _fwd(q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options):
    # A toy attention with a closed-form gradient: out = alpha * (q . k) v per token and head.
    CALLS["fwd"] += 1
    return alpha * (q * k).sum(-1, keepdim=True) * v


def _bwd(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options):
    CALLS["bwd"] += 1
    score = alpha * (q * k).sum(-1, keepdim=True)
    dscore = alpha * (dout * v).sum(-1, keepdim=True)
    return dscore * k, dscore * q, score * dout


def _bwd_fake(dout, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


toy_fwd = define_attention_op("torchrec_hstu_test::toy_attention_fwd", ATTENTION_TENSORS, _fwd, attention_output_fake)
toy_bwd = define_attention_op("torchrec_hstu_test::toy_attention_bwd", ("Tensor dout",) + ATTENTION_TENSORS, _bwd,
                              _bwd_fake, returns="(Tensor, Tensor, Tensor)")
toy_attention = register_attention_autograd(toy_fwd, toy_bwd)


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _inputs(length: int, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(length, 2, 8, dtype=dtype, generator=generator).requires_grad_() for _ in range(3))
    return q, k, v, torch.tensor([0, length]), torch.randn(length, 2, 8, dtype=dtype, generator=generator)


def _run(q, k, v, offsets, dout):
    out = toy_attention(q, k, v, offsets, None, max(q.shape[0], 1), 0.5, AttentionOptions())
    return out, torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("length", [0, 1, 7])
def test_eager_call_runs_the_implementations_without_the_dispatcher(length):
    q, k, v, offsets, dout = _inputs(length)
    assert eager_call_skips_dispatcher((q, k, v, offsets, None))
    out, grads = _run(q, k, v, offsets, dout)
    assert type(out.grad_fn).__name__ == "EagerAttentionBackward"
    with _PassThrough():  # a dispatch mode: the custom op's own autograd
        assert not eager_call_skips_dispatcher((q, k, v, offsets, None))
        out_op, grads_op = _run(q, k, v, offsets, dout)
    assert type(out_op.grad_fn).__name__ != "EagerAttentionBackward"
    torch.testing.assert_close(out_op, out, rtol=0, atol=0)
    for grad_op, grad in zip(grads_op, grads):
        torch.testing.assert_close(grad_op, grad, rtol=0, atol=0)
    # The closed form is right: the same gradients as autograd through the formula.
    ref = 0.5 * (q * k).sum(-1, keepdim=True) * v
    for grad, expected in zip(grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(grad, expected)


def test_eager_function_passes_gradcheck():
    q, k, v, offsets, _ = _inputs(5)
    assert torch.autograd.gradcheck(
        lambda q, k, v: toy_attention(q, k, v, offsets, None, 5, 0.5, AttentionOptions()), (q, k, v))


def test_no_grad_call_builds_no_graph():
    q, k, v, offsets, _ = _inputs(4)
    with torch.no_grad():
        out = toy_attention(q, k, v, offsets, None, 4, 0.5, AttentionOptions())
    assert out.grad_fn is None and not out.requires_grad


def test_subclass_and_functorch_take_the_op():
    q, k, v, offsets, _ = _inputs(3)
    assert not eager_call_skips_dispatcher((torch.nn.Parameter(q.detach()), k, v, offsets, None))
    seen = []

    def first_query_row(q_row):
        seen.append(eager_call_skips_dispatcher((q_row, k, v, offsets, None)))
        return q_row.sum()

    torch.func.grad(first_query_row)(q.detach())
    assert seen == [False]


def test_compiled_graph_records_the_op():
    q, k, v, offsets, dout = _inputs(6)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    fn = torch.compile(lambda q, k, v: toy_attention(q, k, v, offsets, None, 6, 0.5, AttentionOptions()),
                       backend=backend, fullgraph=True)
    before = dict(CALLS)
    out = fn(q, k, v)
    assert graphs and "toy_attention_fwd" in graphs[0]
    assert CALLS["fwd"] > before["fwd"]
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _, eager_grads = _run(q, k, v, offsets, dout)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_two_implementations_per_op_are_refused():
    op = define_attention_op("torchrec_hstu_test::toy_cuda_fwd", ATTENTION_TENSORS, _fwd, attention_output_fake,
                             cuda_impl=_fwd)
    with pytest.raises(ValueError, match="one implementation per op"):
        register_attention_autograd(op, toy_bwd)


def test_eager_forward_hands_its_residual_to_the_eager_backward():
    seen = []

    def forward_with_score(q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options):
        score = alpha * (q * k).sum(-1, keepdim=True)
        return score * v, score

    def backward_with_score(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options, score):
        seen.append(score)
        return _bwd(dout, q, k, v, seq_offsets, num_targets, max_seq_len, alpha, options)

    fwd = define_attention_op("torchrec_hstu_test::residual_fwd", ATTENTION_TENSORS, _fwd, attention_output_fake)
    bwd = define_attention_op("torchrec_hstu_test::residual_bwd", ("Tensor dout",) + ATTENTION_TENSORS, _bwd,
                              _bwd_fake, returns="(Tensor, Tensor, Tensor)")
    attention = register_attention_autograd(fwd, bwd, forward_with_score, backward_with_score)
    q, k, v, offsets, dout = _inputs(5)
    out = attention(q, k, v, offsets, None, 5, 0.5, AttentionOptions())
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], 0.5 * (q * k).sum(-1, keepdim=True).detach(), rtol=0, atol=0)
    _, expected = _run(q, k, v, offsets, dout)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="go together"):
        register_attention_autograd(fwd, bwd, forward_with_score)
