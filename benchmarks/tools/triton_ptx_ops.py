"""Compile the Triton attention kernels for Hopper (sm90) without a GPU and count PTX opcodes.

A refactor of the kernels' Triton code that should not change what runs can be checked on a
CPU machine: compile both versions and compare, per kernel and constexpr variant, the multiset
of PTX instructions (register names and instruction order aside):

    PYTHONPATH=/tmp/base python benchmarks/tools/triton_ptx_ops.py --out /tmp/before.json
    PYTHONPATH=.         python benchmarks/tools/triton_ptx_ops.py --out /tmp/after.json
    python benchmarks/tools/triton_ptx_ops.py --compare /tmp/before.json /tmp/after.json

Variants: mask modes 0 (plain causal), 1 (id rule, targets), 3 (SLA), 4 (plain non-causal);
bf16 forward, delta forward, backward (fused and dV-only) and the dQ kernel; FP8 modes 0 and 2 forward, delta
forward and (dK, dQ) backward. Triton's bundled ``ptxas``/LLVM do the work (a few minutes on
two cores).
"""

import argparse
import collections
import json
import re
from typing import Counter, Dict

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

_FP8_POINTERS = {"Q", "K", "V", "VT", "DO", "QCT", "KCT", "DOCT"}
_FP32_POINTERS = {"QD", "KD", "VD", "DOD", "QDC", "KDC", "DODC", "DQ"}
_INTS = {"c", "W", "M", "sla_k1", "K2", "H"}
_FLOATS = {"half_alpha", "half_alpha_scale", "alpha", "out_scale", "dk_scale", "dv_scale", "dq_scale"}


def _signature(fn, constexprs: Dict[str, object], fp8: bool) -> Dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride_") or name in _INTS:
            signature[name] = "i32"
        elif name in _FLOATS:
            signature[name] = "fp32"
        elif name in ("seq_offsets", "delta_offsets", "num_targets"):
            signature[name] = "*i64"
        elif fp8 and name in _FP8_POINTERS:
            signature[name] = "*fp8e4nv"
        elif name in _FP32_POINTERS:  # descales, and the fp32 dq accumulator
            signature[name] = "*fp32"
        else:
            signature[name] = "*bf16"
    return signature


def opcode_counts(fn, constexprs: Dict[str, object], fp8: bool, num_warps: int = 4,
                  num_stages: int = 3) -> Counter:
    """PTX opcode multiset of ``fn`` compiled for sm90 with ``constexprs``."""
    source = ASTSource(fn, _signature(fn, constexprs, fp8), constexprs)
    kernel = triton_compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    counts: Counter = collections.Counter()
    for line in kernel.asm["ptx"].splitlines():
        line = line.strip()
        if not line or line.startswith((".", "{", "}", "//", "$")) or line.endswith(":"):
            continue
        line = re.sub(r"^@!?%\S+\s+", "", line)  # predicate guard
        counts[line.split()[0]] += 1
    return counts


def all_kernels() -> Dict[str, Dict[str, int]]:
    from torchrec_hstu.ops.triton import delta_attention, fp8_attention, hstu_attention

    dims = dict(DQK=64, BLOCK_DQK=64, BLOCK_DV=64)
    bf16 = dict(FAST_SILU=True, INPUT_PRECISION="tf32")
    fp8 = dict(INTERPRET=False, MAX_IMPRECISE=0, MAX_IMPRECISE_S=0)
    result = {}
    for mask_mode, has_targets in [(0, False), (1, True), (3, True), (4, False)]:
        mask = dict(MASK_MODE=mask_mode, HAS_TARGETS=has_targets)
        fwd = dict(dims, DV=64, **mask)
        bwd = dict(dims, DV_DIM=64, **mask)
        variants = {
            "fwd": (hstu_attention._hstu_fwd_kernel, dict(fwd, BLOCK_M=128, BLOCK_N=64, **bf16), False, 4, 3),
            "delta": (delta_attention._delta_fwd_kernel, dict(fwd, BLOCK_M=16, BLOCK_N=64, **bf16), False, 4, 3),
        }
        for compute_dkdq in (True, False):
            variants[f"bwd_dkdq{int(compute_dkdq)}"] = (
                hstu_attention._hstu_bwd_kernel,
                dict(bwd, BLOCK_M=32, BLOCK_N=128, COMPUTE_DV=True, COMPUTE_DK=compute_dkdq,
                     ATOMIC_DQ=compute_dkdq, **bf16),
                False, 8, 3)
        variants["bwd_dq_kernel"] = (hstu_attention._hstu_bwd_dq_kernel,
                                     dict(bwd, BLOCK_M=128, BLOCK_N=64, **bf16), False, 8, 3)
        for quant_mode in (0, 2):
            fp8_fwd = dict(fwd, BLOCK_M=64, BLOCK_N=64, P_ROWS=16, QUANT_MODE=quant_mode, **fp8)
            variants[f"fp8_fwd_q{quant_mode}"] = (fp8_attention._fp8_fwd_kernel, fp8_fwd, True, 4, 3)
            variants[f"fp8_delta_q{quant_mode}"] = (delta_attention._fp8_delta_fwd_kernel, fp8_fwd, True, 4, 3)
            variants[f"fp8_bwd_q{quant_mode}"] = (
                fp8_attention._fp8_bwd_kernel,
                dict(bwd, BLOCK_M=64, BLOCK_N=128, QUANT_MODE=quant_mode, COMPUTE_DV=False,
                     COMPUTE_DKDQ=True, **fp8),
                True, 8, 2)
        for name, (fn, constexprs, is_fp8, warps, stages) in variants.items():
            result[f"{name}/mask{mask_mode}"] = dict(opcode_counts(fn, constexprs, is_fp8, warps, stages))
        print(f"mask mode {mask_mode}: compiled", flush=True)
    return result


def compare(before_path: str, after_path: str) -> int:
    with open(before_path) as handle:
        before = json.load(handle)
    with open(after_path) as handle:
        after = json.load(handle)
    changed = 0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name, {}), after.get(name, {})
        diff = {op: (a.get(op, 0), b.get(op, 0)) for op in set(a) | set(b) if a.get(op, 0) != b.get(op, 0)}
        if diff:
            changed += 1
            print(f"{name}: {sum(a.values())} -> {sum(b.values())} instructions; differ: {diff}")
    print(f"{len(set(before) | set(after)) - changed} of {len(set(before) | set(after))} kernels "
          "have identical opcode multisets")
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the opcode counts of this checkout's kernels here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.out:
        with open(args.out, "w") as handle:
            json.dump(all_kernels(), handle, indent=1, sort_keys=True)
    else:
        parser.error("give --out or --compare")


if __name__ == "__main__":
    main()
