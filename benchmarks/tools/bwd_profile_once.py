"""Time one attention's forward and backward through its public entry, and optionally bracket
one backward with ``cudaProfilerStart/Stop`` for ``ncu --profile-from-start off``.

Kinds: ``triton_bf16``, ``triton_fp8`` (ours), ``cutlass_bf16``, ``cutlass_fp8`` (FBGEMM's
wheel), on B sequences of N tokens, H=4, causal, bf16 inputs. Prints one JSON line: forward ms,
forward+backward ms (median of CUDA-event timings) and their difference, the backward.

    python benchmarks/tools/bwd_profile_once.py --kind triton_fp8 --mode 2 [--n 8192 --dim 128]
    ncu --profile-from-start off --clock-control none --set full --import-source yes -o rep \\
        python benchmarks/tools/bwd_profile_once.py --kind triton_fp8 --profile
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402


def attention_of(kind: str, mode: int):
    options = AttentionOptions(fp8_quant_mode=mode if kind.endswith("fp8") else -1)
    if kind.startswith("cutlass"):
        from torchrec_hstu.ops.cutlass import cutlass_hstu_attention

        return lambda q, k, v, offsets, n, alpha: cutlass_hstu_attention(q, k, v, offsets, n, alpha, options)
    if kind == "triton_fp8":
        from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention

        return lambda q, k, v, offsets, n, alpha: triton_fp8_hstu_attention(q, k, v, offsets, n, alpha, options)
    from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

    return lambda q, k, v, offsets, n, alpha: triton_hstu_attention(q, k, v, offsets, n, alpha, options)


def attention_inputs(batch: int, n: int, dim: int, heads: int = 4):
    """``(seq_offsets, [q, k, v] requiring grad, dout)``: ``batch`` sequences of ``n`` tokens,
    bf16 on CUDA."""
    offsets = torch.tensor([0] + [n] * batch, device="cuda").cumsum(0)
    leaves = [torch.empty(batch * n, heads, dim, device="cuda", dtype=torch.bfloat16)
              .uniform_(-1, 1).requires_grad_() for _ in range(3)]
    dout = torch.randn(batch * n, heads, dim, device="cuda", dtype=torch.bfloat16)
    return offsets, leaves, dout


def median_ms(fn, reps: int = 10) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_breakdown(fn, row: dict, calls: int = 5) -> dict:
    """GPU microseconds per call of each kernel ``fn`` launches, their sum, and the host's wall
    time per call (the larger of the two is what a caller waits for)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            kernels[event.key[:90]] = [round(event.device_time_total / calls, 1), event.count // calls]
    gpu_us = sum(us for us, _ in kernels.values())
    # Host time alone: issue the calls without waiting for the GPU (the queue holds them).
    torch.cuda.synchronize()
    host_start = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = (time.perf_counter() - host_start) * 1e6 / calls
    torch.cuda.synchronize()
    return {"kind": row["kind"], "mode": row["mode"], "n": row["n"], "dim": row["dim"],
            "profiled_wall_us_per_call": round(start.elapsed_time(end) * 1000 / calls, 1),
            "gpu_us_per_call": round(gpu_us, 1), "host_us_per_call": round(host_us, 1),
            "kernels_us_and_launches_per_call": dict(sorted(kernels.items(), key=lambda kv: -kv[1][0]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", required=True,
                        choices=["triton_bf16", "triton_fp8", "cutlass_bf16", "cutlass_fp8"])
    parser.add_argument("--mode", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--log", action="store_true", help="print the autotuner's timings")
    parser.add_argument("--kernels", action="store_true",
                        help="also print one JSON line of GPU time per kernel (torch.profiler, per fwd+bwd call)")
    args = parser.parse_args()
    if args.log:
        logging.basicConfig(level=logging.INFO)
    alpha = 1.0 / args.dim**0.5
    offsets, leaves, dout = attention_inputs(args.batch, args.n, args.dim)
    attention = attention_of(args.kind, args.mode)

    def fwd():
        with torch.no_grad():
            attention(*leaves, offsets, args.n, alpha)

    def fwd_bwd():
        torch.autograd.grad(attention(*leaves, offsets, args.n, alpha), leaves, dout)

    for _ in range(3):  # compile and autotune outside the timing
        fwd_bwd()
    torch.cuda.synchronize()
    row = {"kind": args.kind, "mode": args.mode if args.kind.endswith("fp8") else -1,
           "batch": args.batch, "n": args.n, "dim": args.dim,
           "fwd_ms": median_ms(fwd), "fwd_bwd_ms": median_ms(fwd_bwd)}
    row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
    print(json.dumps(row), flush=True)
    if args.kernels:
        print(json.dumps(kernel_breakdown(fwd_bwd, row)), flush=True)
    if args.profile:
        out = attention(*leaves, offsets, args.n, alpha)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        torch.autograd.grad(out, leaves, dout)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
