"""The opaque FP8 export op ``torchrec_hstu::hstu_fp8_fwd``: opcheck, torch.export of STU models
with dynamic jagged dims, and eager never going through it."""

import pytest
import torch
from torch.export import Dim, export
from torch.utils._python_dispatch import TorchDispatchMode

from torchrec_hstu.modules.stu import STULayer, STUStack
from torchrec_hstu.ops.backends import installed_backend
from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel
from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated
from torchrec_hstu.ops.fp8.export_op import call_hstu_fp8_fwd

OP = torch.ops.torchrec_hstu.hstu_fp8_fwd.default


def hstu_fp8_fwd(q, k, v, offsets, nt, max_seq_len, alpha, options, kernel):
    """The op called with its schema's arguments (the options through their codec)."""
    return OP(q, k, v, offsets, nt, max_seq_len, alpha, *options.to_op_args(), kernel)


def jagged(lengths, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), dim, generator=gen), torch.tensor([0] + lengths).cumsum(0)


@pytest.mark.parametrize("mode", [0, 1, 2, 5])
@pytest.mark.parametrize("with_targets", [False, True])
def test_opcheck(mode, with_targets):
    gen = torch.Generator().manual_seed(mode)
    q, k, v = (torch.randn(40, 2, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
    offsets = torch.tensor([0, 0, 17, 18, 40])
    nt = torch.tensor([0, 2, 1, 3]) if with_targets else None
    options = AttentionOptions(fp8_quant_mode=mode, contextual_seq_len=1 if with_targets else 0)
    args = (q, k, v, offsets, nt, 22, 0.25, *options.to_op_args(), "PYTORCH")
    torch.library.opcheck(OP, args)
    out = OP(*args)
    assert torch.equal(out, fp8_hstu_attention_emulated(q, k, v, offsets, 22, 0.25, options, nt))


def test_cpu_impl_runs_the_emulation_for_every_kernel_and_refuses_unknown_names():
    # Notes decision 8: on CPU the op computes every kernel's FP8 definition with the emulation.
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(20, 2, 16, generator=gen) for _ in range(3))
    offsets = torch.tensor([0, 9, 20])
    want = fp8_hstu_attention_emulated(q, k, v, offsets, 11, 0.25, AttentionOptions(fp8_quant_mode=2))
    for kernel in ("PYTORCH", "TRITON", "CUTLASS"):
        got = hstu_fp8_fwd(q, k, v, offsets, None, 11, 0.25, AttentionOptions(fp8_quant_mode=2), kernel)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="kernel must be one of"):
        hstu_fp8_fwd(q, k, v, offsets, None, 11, 0.25, AttentionOptions(fp8_quant_mode=2), "FLASH")


def test_call_helper_passes_every_option():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(30, 2, 8, generator=gen) for _ in range(3))
    offsets = torch.tensor([0, 12, 30])
    nt = torch.tensor([2, 3])
    for options in (
        AttentionOptions(fp8_quant_mode=3, sla_k1=4, sla_k2=2, contextual_seq_len=1, scaling_seqlen=40),
        AttentionOptions(fp8_quant_mode=1, max_attn_len=3, min_full_attn_seq_len=2),
        AttentionOptions(fp8_quant_mode=4, causal=False),
    ):
        got = call_hstu_fp8_fwd(q, k, v, offsets, 18, 0.3, options, nt)
        assert torch.equal(got, fp8_hstu_attention_emulated(q, k, v, offsets, 18, 0.3, options, nt))


def _export_and_check(model, batches, num_layers, kernel="PYTORCH"):
    x, offsets, nt = batches[0]
    total, batch = Dim("total", min=2, max=1 << 16), Dim("batch", min=1, max=1024)
    with torch.no_grad():
        ep = export(
            model,
            (x, offsets, 40, nt),
            dynamic_shapes=({0: total}, {0: batch + 1}, None, {0: batch}),
            strict=False,
        )
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    assert sum(n.target == OP for n in nodes) == num_layers
    # The graph records the kernel the model resolved (the CUDA impl runs exactly it).
    assert {n.args[-1] for n in nodes if n.target == OP} == {kernel}
    for n in nodes:  # no quantizer internals: nothing float8, no scatter/amax
        val = n.meta.get("val")
        assert not (isinstance(val, torch.Tensor) and val.dtype == torch.float8_e4m3fn), n
        assert "scatter" not in str(n.target) and "amax" not in str(n.target), n
    module = ep.module()
    for x, offsets, nt in batches:
        with torch.no_grad():
            want = model(x, offsets, 40, nt)
            got = module(x, offsets, 40, nt)
        assert torch.equal(got, want)
    return ep


def _batches(dim):
    out = []
    for seed, (lengths, targets) in enumerate((([5, 0, 12, 1], [1, 0, 3, 1]), ([40, 7, 2], [5, 2, 0]), ([3], [3]))):
        x, offsets = jagged(lengths, dim, seed)
        out.append((x, offsets, torch.tensor(targets)))
    return out


@pytest.mark.parametrize("mode", range(6))
def test_export_stu_layer_all_modes(mode):
    torch.manual_seed(mode)
    layer = STULayer(32, 2, 16, 16, fp8_quant_mode=mode, contextual_seq_len=1).eval()
    _export_and_check(layer, _batches(32), num_layers=1)


class _StackEmbeddings(torch.nn.Module):
    """STUStack returning its embeddings (its output dataclass is not a pytree)."""

    def __init__(self, stack: STUStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, x, offsets, max_seq_len: int, num_targets):
        return self.stack(x, offsets, max_seq_len, num_targets).x


def test_export_stu_stack_sla_one_node_per_layer():
    torch.manual_seed(0)
    layers = [STULayer(32, 2, 16, 16, fp8_quant_mode=2, sla_k1=4, sla_k2=2) for _ in range(2)]
    _export_and_check(_StackEmbeddings(STUStack(layers)).eval(), _batches(32), num_layers=2)


def test_export_cutlass_model_on_cpu_skips_the_gate():
    """A CUTLASS FP8 model exports here (no GPU, no wheel); the exported op then runs the
    FP8 emulation on CPU, equal to the eager PYTORCH FP8 model. Where a wheel imports, its
    declared FP8 modes decide (run on the GPU machine: FBGEMM's wheel refuses mode 2)."""
    torch.manual_seed(1)
    cutlass = STULayer(32, 2, 64, 64, fp8_quant_mode=2, kernel=HSTUKernel.CUTLASS).eval()
    torch.manual_seed(1)
    pytorch = STULayer(32, 2, 64, 64, fp8_quant_mode=2, kernel=HSTUKernel.PYTORCH).eval()
    x, offsets, nt = _batches(32)[0]
    # Eager refuses: without a wheel (RuntimeError: not installed), with one (ValueError naming
    # what the installed wheel cannot run; found on the GPU machine, where FBGEMM's imports).
    with pytest.raises((RuntimeError, ValueError), match="kernel=CUTLASS"):
        cutlass(x, offsets, 40, nt)
    total, batch = Dim("total", min=2, max=1 << 16), Dim("batch", min=1, max=1024)
    dynamic_shapes = ({0: total}, {0: batch + 1}, None, {0: batch})
    installed = installed_backend(HSTUKernel.CUTLASS)
    if installed is not None and 2 not in installed.capabilities.fp8_forward_modes:
        # A wheel that imports here speaks for CUTLASS (the GPU machine's FBGEMM wheel: FP8
        # mode 5 only), so the export is refused, naming the mode.
        with torch.no_grad(), pytest.raises(ValueError, match="fp8_quant_mode=2"):
            export(cutlass, (x, offsets, 40, nt), dynamic_shapes=dynamic_shapes, strict=False)
        return
    with torch.no_grad():
        ep = export(cutlass, (x, offsets, 40, nt), dynamic_shapes=dynamic_shapes, strict=False)
        (node,) = [n for n in ep.graph.nodes if n.target == OP]
        assert node.args[-1] == "CUTLASS"  # on CUDA the op would run the wheel or raise
        for x, offsets, nt in _batches(32):
            assert torch.equal(ep.module()(x, offsets, 40, nt), pytorch(x, offsets, 40, nt))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_train_and_eval_never_use_the_op():
    torch.manual_seed(0)
    layer = STULayer(32, 2, 16, 16, fp8_quant_mode=3)
    x, offsets, nt = _batches(32)[0]
    x.requires_grad_()
    for training in (True, False):
        layer.train(training)
        log = _OpLog()
        with log:
            out = layer(x, offsets, 40, nt)
            out.sum().backward()
        assert not any("hstu_fp8_fwd" in op for op in log.ops)
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
        x.grad = None


@pytest.mark.gpu
def test_cuda_impl_runs_exactly_the_recorded_kernel():
    """On CUDA the op runs the exported kernel: PYTORCH -> the emulation, TRITON -> the Triton
    FP8 kernel (same FP8 definition, fp32 summation order apart), CUTLASS without the wheel ->
    an error naming it, never another kernel."""
    from torchrec_hstu.ops.cutlass import cutlass_available

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(300, 2, 64, generator=gen).cuda() for _ in range(3))
    offsets = torch.tensor([0, 1, 130, 300]).cuda()
    options = AttentionOptions(fp8_quant_mode=2)
    want = fp8_hstu_attention_emulated(q, k, v, offsets, 170, 0.125, options)
    args = (q, k, v, offsets, None, 170, 0.125, options)
    assert torch.equal(hstu_fp8_fwd(*args, "PYTORCH"), want)
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention

    triton_out = hstu_fp8_fwd(*args, "TRITON")
    assert torch.equal(triton_out, triton_fp8_hstu_attention(q, k, v, offsets, 170, 0.125, options))
    if not cutlass_available():
        with pytest.raises(RuntimeError, match="kernel=CUTLASS"):
            hstu_fp8_fwd(*args, "CUTLASS")
    else:  # FBGEMM's wheel computes mode 5 only: mode 2 is refused naming the capability
        with pytest.raises(ValueError, match="kernel=CUTLASS"):
            hstu_fp8_fwd(*args, "CUTLASS")
