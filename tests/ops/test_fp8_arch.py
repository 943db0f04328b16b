"""The FP8 arch gate (monkeypatched CUDA capabilities) and the backend table's refusals."""

import sys

import pytest
import torch

from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel
from torchrec_hstu.ops.fp8.arch import (
    FP8BackwardUnsupportedError,
    check_fp8_quant_mode,
    check_fp8_support,
    refuse_backward,
)
from torchrec_hstu.ops.hstu_attention import hstu_attention

CUDA = torch.device("cuda", 0)
SM = {"SM80": (8, 0), "SM86": (8, 6), "SM89": (8, 9), "SM90": (9, 0), "SM100": (10, 0), "SM120": (12, 0)}


@pytest.fixture
def capability(monkeypatch):
    def set_capability(cap):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    return set_capability


def expected(kernel: HSTUKernel, arch: str, mode: int):
    """The gate's contract: True/False (backward supported) or the exception type."""
    major, minor = SM[arch]
    if kernel == HSTUKernel.PYTORCH:
        return True
    if kernel == HSTUKernel.TRITON:
        return True if (major, minor) >= (8, 9) else RuntimeError
    if major == 9:
        return True
    if major == 12 and mode == 2:
        return False
    return RuntimeError


@pytest.mark.parametrize("kernel", [HSTUKernel.PYTORCH, HSTUKernel.TRITON, HSTUKernel.CUTLASS])
@pytest.mark.parametrize("arch", list(SM))
@pytest.mark.parametrize("mode", range(6))
def test_gate_matrix(capability, kernel, arch, mode):
    capability(SM[arch])
    want = expected(kernel, arch, mode)
    if want is RuntimeError:
        with pytest.raises(RuntimeError, match=r"SM\d+"):
            check_fp8_support(kernel, mode, 128, 128, CUDA)
    else:
        assert check_fp8_support(kernel, mode, 128, 128, CUDA) is want


def test_gate_needs_cuda_tensors_for_triton_and_cutlass():
    assert check_fp8_support(HSTUKernel.PYTORCH, 3, 8, 8, torch.device("cpu")) is True
    for kernel in (HSTUKernel.TRITON, HSTUKernel.CUTLASS):
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            check_fp8_support(kernel, 2, 64, 64, torch.device("cpu"))


@pytest.mark.parametrize("bad", [-1, 6, 100, 2.0, True, "2"])
def test_out_of_range_modes_name_the_argument(bad):
    with pytest.raises(ValueError, match="fp8_quant_mode"):
        check_fp8_quant_mode(bad)
    with pytest.raises(ValueError, match="fp8_quant_mode"):
        check_fp8_support(HSTUKernel.PYTORCH, bad, 64, 64, torch.device("cpu"))


def test_options_refuse_out_of_range_modes():
    with pytest.raises(ValueError, match="fp8_quant_mode"):
        AttentionOptions(fp8_quant_mode=6)


@pytest.mark.parametrize("dim", [32, 96, 512])
def test_cutlass_head_dims(capability, dim):
    capability((9, 0))
    with pytest.raises(ValueError, match="attention_dim"):
        check_fp8_support(HSTUKernel.CUTLASS, 2, dim, dim, CUDA)
    with pytest.raises(ValueError, match="attention_dim == hidden_dim"):
        check_fp8_support(HSTUKernel.CUTLASS, 2, 64, 128, CUDA)
    for ok in (64, 128, 256):
        assert check_fp8_support(HSTUKernel.CUTLASS, 2, ok, ok, CUDA)
    # the PyTorch emulation and Triton take any head dim
    assert check_fp8_support(HSTUKernel.PYTORCH, 2, dim, dim + 8, CUDA)
    assert check_fp8_support(HSTUKernel.TRITON, 2, dim, dim, CUDA)


def test_refuse_backward_raises_only_on_backward():
    x = torch.randn(3, requires_grad=True)
    y = refuse_backward(x * 2, "forward-only here")
    assert torch.equal(y, x.detach() * 2)
    with pytest.raises(FP8BackwardUnsupportedError, match="forward-only here"):
        y.sum().backward()
    with torch.no_grad():
        z = refuse_backward(x * 2, "unused")
    assert not z.requires_grad


def _batch():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 2, 64, generator=gen).to(torch.bfloat16) for _ in range(3))
    return q, k, v, torch.tensor([0, 3, 7])


def test_dispatch_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # as if this build had no Triton
    q, k, v, offsets = _batch()
    with pytest.raises(RuntimeError, match="kernel=TRITON is not available here"):
        hstu_attention(q, k, v, offsets, 4, 0.125, AttentionOptions(fp8_quant_mode=2), kernel=HSTUKernel.TRITON)


def test_dispatch_cutlass_fp8_refused_without_wheel_or_without_cuda(monkeypatch):
    import types

    q, k, v, offsets = _batch()
    options = AttentionOptions(fp8_quant_mode=2)
    monkeypatch.setitem(sys.modules, "hstu", None)  # no wheel
    monkeypatch.setitem(sys.modules, "fbgemm_gpu.experimental.hstu", None)
    with pytest.raises(RuntimeError, match="needs a CUTLASS HSTU wheel"):
        hstu_attention(q, k, v, offsets, 4, 0.125, options, kernel=HSTUKernel.CUTLASS)
    calls = []
    wheel = types.ModuleType("hstu")
    wheel.hstu_attn_varlen_func = lambda *a, **kw: calls.append(kw)  # must never be reached
    monkeypatch.setitem(sys.modules, "hstu", wheel)
    with pytest.raises(ValueError, match="cannot run tensors on cpu"):
        hstu_attention(q, k, v, offsets, 4, 0.125, options, kernel=HSTUKernel.CUTLASS)
    with pytest.raises(ValueError, match="cannot run dtype float32"):
        hstu_attention(q.float(), k.float(), v.float(), offsets, 4, 0.125, options, kernel="CUTLASS")
    assert calls == []


def test_dispatch_bad_mode_is_value_error():
    q, k, v, offsets = _batch()
    with pytest.raises(ValueError, match="fp8_quant_mode=7"):
        hstu_attention(q, k, v, offsets, 4, 0.125, _options_with_mode(7))


def _options_with_mode(mode: int) -> AttentionOptions:
    # bypass the dataclass check to reach the backend table's own
    options = AttentionOptions()
    object.__setattr__(options, "fp8_quant_mode", mode)
    return options
