"""``torch.compile`` sees an ``STUStack`` as one graph (issue 17: compiling the dense parts
around the attention ops halved an H200 step's GPU time and, with CUDA graphs, cut its host
time ~4x; a graph break per attention call undid it).

CPU: the PYTORCH stack compiles with ``fullgraph=True`` (forward and backward, ``aot_eager``
backend: traced by dynamo and AOTAutograd, run without inductor's C++ build) and matches
eager; the dataclasses built on every attention call carry no object defaults (torch 2.11's
dynamo could not wrap one and broke the graph at each call). GPU: the TRITON stack is one graph.
"""

import dataclasses

import pytest
import torch

from torchrec_hstu.modules import STUStack
from torchrec_hstu.ops.backends import AttentionRequest
from torchrec_hstu.ops.common import check_jagged_batch_sync
from torchrec_hstu.ops.jagged import lengths_to_offsets

STU = dict(embedding_dim=32, num_heads=2, hidden_dim=16, attention_dim=16, output_dropout_ratio=0.0)


def _batch(device: torch.device, with_targets: bool):
    lengths = torch.tensor([5, 1, 9, 0, 3])
    offsets = lengths_to_offsets(lengths).to(device)
    num_targets = torch.tensor([1, 1, 2, 0, 1], device=device) if with_targets else None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(int(lengths.sum()), STU["embedding_dim"], generator=gen).to(device)
    facts = check_jagged_batch_sync(offsets, x.shape[0], 9, num_targets)
    return x, offsets, num_targets, facts


def _graphs_and_breaks(stack: STUStack, device: torch.device, with_targets: bool):
    x, offsets, num_targets, facts = _batch(device, with_targets)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return stack(x, offsets, 9, num_targets, batch_facts=facts).x

    explained = torch._dynamo.explain(forward)(x.requires_grad_())
    return explained.graph_count, [b.reason for b in explained.break_reasons]


def test_per_call_dataclasses_have_no_object_defaults():
    for field in dataclasses.fields(AttentionRequest):
        default = field.default
        assert default is dataclasses.MISSING or isinstance(default, (bool, int, float, str, type(None))), (
            f"AttentionRequest.{field.name} defaults to a {type(default).__name__} instance"
        )


@pytest.mark.parametrize("with_targets", [False, True])
def test_pytorch_stack_is_one_graph(with_targets):
    torch._dynamo.reset()
    stack = STUStack.uniform(STU, 2, kernel="PYTORCH")
    graphs, breaks = _graphs_and_breaks(stack, torch.device("cpu"), with_targets)
    assert (graphs, breaks) == (1, [])


def test_fullgraph_compile_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    stack = STUStack.uniform(STU, 2, kernel="PYTORCH")
    compiled = torch.compile(stack, backend="aot_eager", fullgraph=True)
    x, offsets, num_targets, facts = _batch(torch.device("cpu"), True)
    outputs = []
    for model in (stack, compiled):
        inputs = x.clone().requires_grad_()
        out = model(inputs, offsets, 9, num_targets, batch_facts=facts).x
        (grad,) = torch.autograd.grad(out.square().sum(), inputs)
        outputs.append((out.detach(), grad))
    # float32: AOTAutograd may reorder reductions in the backward
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("with_targets", [False, True])
def test_triton_stack_is_one_graph(with_targets):
    torch._dynamo.reset()
    stack = STUStack.uniform(STU, 2, kernel="TRITON").cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphs, breaks = _graphs_and_breaks(stack, torch.device("cuda"), with_targets)
    assert (graphs, breaks) == (1, [])
