"""The Python host cost of one eager Triton bf16 forward+backward, measured on a CPU machine: the
three kernel launches are replaced by no-ops and the shape classes' configs are pinned as after
autotuning, so what remains is this package's wrappers, the autograd Function and the autograd
engine (Triton's own launcher is not included). Prints the best of five 1000-step timings and
the number of Python function calls per step (deterministic, unlike the time on a shared box).

    python benchmarks/tools/host_overhead_cpu.py
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
    args = parser.parse_args()
    # CPU tensors stand in for CUDA ones; nothing reads them.
    triton_attention.interpret_mode = lambda: False
    triton_common.interpret_mode = lambda: False
    triton_attention.check_triton_inputs = lambda *a, **k: None
    for name in ("_hstu_fwd_kernel", "_hstu_bwd_kernel", "_hstu_bwd_dq_kernel"):
        setattr(triton_attention, name, _NoLaunch())
    config = triton_attention.KernelConfig
    # The configs the H200's autotuner chose at N=1024, D=128 (benchmarks/results, session 5).
    shape_class = (torch.bfloat16, 128, 128, 0, 1024)
    triton_attention.set_config(("fwd",) + shape_class, config(128, 32, 8, 4))
    triton_attention.set_config(("bwd",) + shape_class, config(32, 128, 8, 3, dq=config(128, 64, 8, 3)))

    batch, heads, tokens_per_seq = 32, 4, 8  # few tokens: the stubbed kernels never read them
    total = batch * tokens_per_seq
    offsets = torch.arange(0, total + 1, tokens_per_seq)
    leaves = [torch.zeros(total, heads, args.dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    dout = torch.zeros(total, heads, args.dim, dtype=torch.bfloat16)
    options = AttentionOptions()

    def step() -> None:
        out = triton_attention.triton_hstu_attention(*leaves, offsets, args.max_seq_len, args.dim**-0.5, options)
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
    calls = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
    print(f"{triton_attention.__file__}: best of 5 x {args.steps} steps {best:.1f} us/step, "
          f"{calls} Python calls/step")


if __name__ == "__main__":
    main()
