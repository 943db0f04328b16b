"""The Python host cost of one eager Triton bf16 or FP8 forward+backward, measured on a CPU
machine: the kernel launches are replaced by no-ops and the shape classes' configs are pinned as
after autotuning, so what remains is this package's wrappers, the small torch ops between the
launches, the autograd Function and the autograd engine (Triton's own launcher is not included).
Prints the best of five timings and the number of Python function calls per step
(deterministic, unlike the time on a shared box); ``--top N`` also prints the N functions with
the most cumulative time in one profiled step.

    python benchmarks/tools/host_overhead_cpu.py [--fp8-mode 2] [--top 25]
    PYTHONPATH=/path/to/other/checkout python benchmarks/tools/host_overhead_cpu.py   # A/B

The repository root is *not* put on ``sys.path`` here, so ``PYTHONPATH`` picks the package.
"""
import argparse
import cProfile
import os
import pstats
import time

os.environ.setdefault("TORCHREC_HSTU_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

import torchrec_hstu.ops.triton._common as triton_common  # noqa: E402
import torchrec_hstu.ops.triton.fp8_attention as fp8_attention  # noqa: E402
import torchrec_hstu.ops.triton.fp8_quantize as fp8_quantize  # noqa: E402
import torchrec_hstu.ops.triton.hstu_attention as triton_attention  # noqa: E402
from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--fp8-mode", type=int, default=-1, help="-1: bf16; 0..5: the FP8 path")
    parser.add_argument("--top", type=int, default=0)
    args = parser.parse_args()
    # CPU tensors stand in for CUDA ones; nothing reads them.
    for module in (triton_attention, triton_common, fp8_attention, fp8_quantize):
        module.interpret_mode = lambda: False  # type: ignore[attr-defined]
    for module in (triton_attention, fp8_attention):
        module.check_triton_inputs = lambda *a, **k: None  # type: ignore[attr-defined]
    # As on SM90: the FP8 backward reads its per-tile operands through TMA descriptors.
    fp8_attention.fp8_bwd_tma_supported = lambda *a, **k: True
    for module, names in ((triton_attention, ("_hstu_fwd_kernel", "_hstu_bwd_kernel", "_hstu_bwd_dq_kernel")),
                          (fp8_attention, ("_fp8_fwd_kernel", "_fp8_bwd_kernel", "_fp8_bwd_dq_kernel",
                                           "_transpose_kernel")),
                          (fp8_quantize, ("_seq_kernel", "_rows_kernel"))):
        for name in names:
            setattr(module, name, _NoLaunch())
    config = triton_attention.KernelConfig
    # The configs the H200's autotuner chose at N=1024, D=128 (benchmarks/results, sessions 5, 6).
    shape_class = (torch.bfloat16, 128, 128, 0, 1024)
    triton_attention.set_config(("fwd",) + shape_class, config(128, 32, 8, 4))
    triton_attention.set_config(("bwd",) + shape_class, config(32, 128, 8, 3, dq=config(128, 64, 8, 3)))
    if args.fp8_mode >= 0:
        fp8_class = (args.fp8_mode, "fast") + shape_class
        triton_attention.set_config(("fp8_fwd",) + fp8_class, fp8_attention.FP8KernelConfig(64, 0, 4, 3))
        triton_attention.set_config(("fp8_bwd",) + fp8_class, config(0, 0, 8, 3, dq=config(0, 0, 4, 3)))

    batch, heads, tokens_per_seq = 32, 4, 8  # few tokens: the stubbed kernels never read them
    total = batch * tokens_per_seq
    offsets = torch.arange(0, total + 1, tokens_per_seq)
    leaves = [torch.zeros(total, heads, args.dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    dout = torch.zeros(total, heads, args.dim, dtype=torch.bfloat16)
    options = AttentionOptions(fp8_quant_mode=args.fp8_mode)
    attention = (fp8_attention.triton_fp8_hstu_attention if args.fp8_mode >= 0
                 else triton_attention.triton_hstu_attention)

    def step() -> None:
        out = attention(*leaves, offsets, args.max_seq_len, args.dim**-0.5, options)
        torch.autograd.grad(out, leaves, dout)

    for _ in range(200):
        step()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        best = min(best, (time.perf_counter() - start) / args.steps * 1e6)
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    calls = stats.total_calls  # type: ignore[attr-defined]
    kind = "bf16" if args.fp8_mode < 0 else f"FP8 mode {args.fp8_mode}"
    print(f"{triton_attention.__file__} ({kind}): best of 5 x {args.steps} steps {best:.1f} us/step, "
          f"{calls} Python calls/step")
    if args.top:
        stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
