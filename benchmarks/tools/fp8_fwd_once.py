"""Run the FP8 forward kernel (q/k/v pre-quantized) a few times, for ``ncu`` to profile.

    ncu --clock-control none -k regex:_fp8_fwd_kernel -c 1 -s 2 --section SpeedOfLight \\
        python benchmarks/tools/fp8_fwd_once.py --mode 2 --acc fast --cfg 128:8:2
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402
from torchrec_hstu.ops.triton import fp8_attention as fa  # noqa: E402
from torchrec_hstu.ops.triton.hstu_attention import KernelConfig, mask_args_of  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--mode", type=int, default=2)
parser.add_argument("--acc", default="fast")
parser.add_argument("--cfg", default="128:8:2")
parser.add_argument("--n", type=int, default=4096)
args = parser.parse_args()
batch, heads, dim, n = 16, 4, 128, args.n
offsets = torch.tensor([0] + [n] * batch, device="cuda").cumsum(0)
q, k, v = (torch.empty(batch * n, heads, dim, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
           for _ in range(3))
inputs = fa.fp8_fwd_quantize(q, k, v, offsets, n, args.mode)
bm, warps, stages = map(int, args.cfg.split(":"))
mask = mask_args_of(AttentionOptions(), False)
for _ in range(3):
    fa.fp8_fwd_kernel(inputs, torch.bfloat16, offsets, None, n, 1 / dim**0.5, n, mask, args.mode,
                      KernelConfig(bm, 0, warps, stages), args.acc)
torch.cuda.synchronize()
print("done")
