"""No host sync inside the model on CUDA (issue 17, part 1): after the one edge check per batch,
a TRITON forward + backward of ``STUStack``, ``HSTUTransducer`` and the two-channel model under
bf16 autocast runs with ``torch.cuda.set_sync_debug_mode("error")`` and raises nothing.

Inputs are built and the edge check runs before the guarded region (the check itself is the
batch's one host read); a warm-up step first compiles the Triton kernels and fills the
autotuning caches, so the guarded step is a steady-state training step.
"""

from contextlib import contextmanager

import pytest
import torch

from tests.modules.sync_cases import CASES


@contextmanager
def sync_debug_mode(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("make_case", CASES, ids=lambda make: make.__name__)
def test_no_host_sync_after_the_edge_check(make_case, cuda_device):
    case = make_case(cuda_device, "TRITON")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        case.step(case.edge())  # warm-up: kernel compilation and autotuning may sync
        torch.cuda.synchronize()
        case.model.zero_grad(set_to_none=True)
        facts = case.edge()
        assert facts is not None
        with sync_debug_mode("error"):
            loss = case.step(facts)
    torch.cuda.synchronize()
    assert torch.isfinite(loss).item()
    grads = [p.grad for p in case.model.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
