"""Where the host's time goes in one eager attention call: cProfile over forward+backward calls
issued without waiting for the GPU (the launch queue holds them), Python functions sorted by
their own time, then by cumulative time.

    python benchmarks/tools/host_profile_once.py --kind triton_bf16 --n 1024 --batch 32
    python benchmarks/tools/host_profile_once.py --kind triton_fp8 --mode 2 --n 4096
    python benchmarks/tools/host_profile_once.py --kind triton_bf16 --ab   # one JSON line, no cProfile

``--ab`` times the host alone, in one process: forward+backward through the eager
``torch.autograd.Function`` (the default) and through the custom op (the eager fast path
patched off), the forward under ``no_grad``, and ``torch.autograd.grad`` of a three-leaf
elementwise graph (the autograd engine's own cost).
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

import torchrec_hstu.ops.custom_ops as custom_ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bwd_profile_once import attention_inputs, attention_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", required=True,
                        choices=["triton_bf16", "triton_fp8", "cutlass_bf16", "cutlass_fp8"])
    parser.add_argument("--mode", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--ab", action="store_true", help="host times of both dispatch routes (JSON)")
    args = parser.parse_args()
    alpha = 1.0 / args.dim**0.5
    offsets, leaves, dout = attention_inputs(args.batch, args.n, args.dim)
    attention = attention_of(args.kind, args.mode)

    def fwd_bwd():
        torch.autograd.grad(attention(*leaves, offsets, args.n, alpha), leaves, dout)

    def host_us_of(fn, calls: int = args.calls) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        return round(elapsed * 1e6 / calls, 1)

    host_us = host_us_of(fwd_bwd)
    if args.ab:
        def fwd_no_grad():
            with torch.no_grad():
                attention(*leaves, offsets, args.n, alpha)

        def engine_only():
            torch.autograd.grad((leaves[0] * leaves[1] + leaves[2]).sum(), leaves)

        row = {"kind": args.kind, "mode": args.mode, "n": args.n, "batch": args.batch,
               "host_us_fwd_bwd_eager_function": host_us}
        skips = custom_ops.eager_call_skips_dispatcher
        custom_ops.eager_call_skips_dispatcher = lambda tensors: False  # type: ignore[assignment]
        row["host_us_fwd_bwd_custom_op"] = host_us_of(fwd_bwd)
        custom_ops.eager_call_skips_dispatcher = skips
        row["host_us_fwd_bwd_eager_function_again"] = host_us_of(fwd_bwd)
        row["host_us_fwd_no_grad"] = host_us_of(fwd_no_grad)
        row["host_us_autograd_engine_3_leaves"] = host_us_of(engine_only)
        print(json.dumps(row), flush=True)
        return
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls):
        fwd_bwd()
    profiler.disable()
    torch.cuda.synchronize()
    print(f"{args.kind} mode={args.mode} n={args.n} batch={args.batch}: host {host_us:.1f} us per fwd+bwd call")
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(args.top)
        print(text.getvalue())


if __name__ == "__main__":
    main()
