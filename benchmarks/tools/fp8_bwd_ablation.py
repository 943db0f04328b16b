"""Time the whole FP8 backward (``fp8_bwd``) at one pinned layout, optionally with a part of the
tile's work replaced, to see what that part costs (GPU; timing only, the numbers of an ablated
run are wrong by construction). One variant per process: Triton memoizes a kernel's dependency
hash, so a replaced helper must be in place before the first compile.

    python benchmarks/tools/fp8_bwd_ablation.py --variant base|fixed_scale [--acc fast] [--cfg 8:2/4:2] [--n 8192]

``fixed_scale``: P and dS are cast with a constant scale, without their amax reductions (the
tile-wide ones cross both warpgroups through shared memory; the per-row ones stay in a warp).
The 2026-12-03 run (call 2) was made at commit ebbbbc6, before row scales, where "fast" scaled
per tile: ``--cfg 8:3`` and ``8:2`` (dQ by bulk reductions); that tile-scaled path is now
``--acc mixed`` or ``precise`` (other products, so not the same times).
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bwd_profile_once import median_ms  # noqa: E402
from fp8_bwd_configs import parse_config  # noqa: E402

import torchrec_hstu.ops.triton.fp8_attention as fp8_attention  # noqa: E402
from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402
from torchrec_hstu.ops.triton._common import to_e4m3_saturated  # noqa: E402
from torchrec_hstu.ops.triton.hstu_attention import mask_args_of  # noqa: E402


@triton.jit
def _fixed_scale_tile_quant(x, QUANT_MODE: tl.constexpr, INTERPRET: tl.constexpr):
    return to_e4m3_saturated(x * 64.0, INTERPRET), 1.0 / 64.0


@triton.jit
def _fixed_scale_row_quant(x, QUANT_MODE: tl.constexpr, INTERPRET: tl.constexpr):
    return to_e4m3_saturated(x * 64.0, INTERPRET), tl.full([x.shape[0], 1], 1.0 / 64.0, tl.float32)


parser = argparse.ArgumentParser()
parser.add_argument("--variant", default="base", choices=["base", "fixed_scale"])
parser.add_argument("--mode", type=int, default=2)
parser.add_argument("--cfg", default="8:2/4:2")
parser.add_argument("--acc", default="fast", help="fp8_accumulation")
parser.add_argument("--dim", type=int, default=128)
parser.add_argument("--n", type=int, default=8192)
args = parser.parse_args()
if args.variant == "fixed_scale":
    fp8_attention._tile_quant = _fixed_scale_tile_quant
    fp8_attention._row_quant = _fixed_scale_row_quant
batch, heads, dim, n = 16, 4, args.dim, args.n
offsets = torch.tensor([0] + [n] * batch, device="cuda").cumsum(0)
q, k, v, dout = (torch.empty(batch * n, heads, dim, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
                 for _ in range(4))
mask = mask_args_of(AttentionOptions(), False)


def once():
    fp8_attention.fp8_bwd(dout, q, k, v, offsets, None, n, 1 / dim**0.5, n, mask, args.mode,
                          config=parse_config(args.cfg), fp8_accumulation=args.acc)


for _ in range(3):
    once()
print(json.dumps({"variant": args.variant, "cfg": args.cfg, "acc": args.acc, "mode": args.mode, "n": n, "dim": dim,
                  "fp8_bwd_ms": median_ms(once)}), flush=True)
