"""Run the whole FP8 backward (``fp8_bwd``) a few times at one pinned layout, for ``ncu``.

    ncu --clock-control none -k regex:_fp8_bwd_kernel -c 1 -s 2 --section SpeedOfLight \\
        --section WarpStateStats --section SchedulerStats \\
        python benchmarks/tools/fp8_bwd_once.py --mode 2 --cfg 8:2/4:2 [--acc fast] [--pointers] [--dim 128] [--n 4096]

``--cfg`` is ``fp8_bwd_configs.py``'s syntax (``warps:stages[:split][/warps:stages]``);
``--pointers`` reads the operands by pointer tensors instead of TMA descriptors.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fp8_bwd_configs import parse_config  # noqa: E402

from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402
from torchrec_hstu.ops.triton.fp8_attention import fp8_bwd  # noqa: E402
from torchrec_hstu.ops.triton.hstu_attention import mask_args_of  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--mode", type=int, default=2)
parser.add_argument("--acc", default="fast")
# Row scales ("fast" at D <= 128) need a dQ kernel config ("/w:s"); the tile-scaled
# accumulations also take dQ by atomics ("8:2").
parser.add_argument("--cfg", default="8:2/4:2")
parser.add_argument("--pointers", action="store_true")
parser.add_argument("--dim", type=int, default=128)
parser.add_argument("--n", type=int, default=4096)
args = parser.parse_args()
batch, heads, dim, n = 16, 4, args.dim, args.n
offsets = torch.tensor([0] + [n] * batch, device="cuda").cumsum(0)
q, k, v, dout = (torch.empty(batch * n, heads, dim, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
                 for _ in range(4))
mask = mask_args_of(AttentionOptions(), False)
for _ in range(3):
    fp8_bwd(dout, q, k, v, offsets, None, n, 1 / dim**0.5, n, mask, args.mode,
            config=parse_config(args.cfg), fp8_accumulation=args.acc, tma=not args.pointers)
torch.cuda.synchronize()
print("done")
