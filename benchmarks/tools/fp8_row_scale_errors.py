"""The FP8 backward's two definitions side by side (CPU, the PyTorch emulation): P / dS scaled
per 64 x 128 tile (the CUTLASS kernel's) and per row of the tile (``FP8TileSizes.bwd_row_scales``,
the Triton "fast" default at head dims <= 128; dQ's dS per query over ``bwd_dq_block_n`` keys).
Prints and writes each gradient's error vs the float64 reference, relative L2 and max-abs over
max|ref|, for bf16 inputs, modes 0..5.

    python benchmarks/tools/fp8_row_scale_errors.py --out row_scale_errors.json [--dims 64,128]
"""
import argparse
import json

import torch

from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated
from torchrec_hstu.ops.fp8.quantize import FP8TileSizes
from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention

LENGTHS = [300, 1, 0, 129, 64]


def gradients(fn, leaves, offsets, max_seq_len, alpha, options, dout, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves, offsets, max_seq_len, alpha, options, **kwargs)
    return torch.autograd.grad(out, leaves, dout.to(out.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dims", default="64,128")
    args = parser.parse_args()
    offsets = torch.tensor([0] + LENGTHS).cumsum(0)
    max_seq_len, rows = max(LENGTHS), []
    for dim in map(int, args.dims.split(",")):
        alpha = dim**-0.5
        for mode in range(6):
            gen = torch.Generator().manual_seed(20 + mode)
            q, k, v, dout = (torch.randn(sum(LENGTHS), 2, dim, generator=gen).to(torch.bfloat16) for _ in range(4))
            options = AttentionOptions(fp8_quant_mode=mode)
            ref = gradients(pytorch_hstu_attention, [x.double() for x in (q, k, v)], offsets, max_seq_len, alpha,
                            AttentionOptions(), dout.double())
            tile = gradients(fp8_hstu_attention_emulated, [q, k, v], offsets, max_seq_len, alpha, options, dout)
            row = gradients(fp8_hstu_attention_emulated, [q, k, v], offsets, max_seq_len, alpha, options, dout,
                            tile_sizes=FP8TileSizes.for_head_dim(dim, bwd_row_scales=True))
            for name, t, r, f in zip(("dq", "dk", "dv"), tile, row, ref):
                def l2(x, f=f):
                    return float((x.double() - f).norm() / f.norm())

                def mx(x, f=f):
                    return float((x.double() - f).abs().max() / f.abs().max())

                rows.append(dict(D=dim, mode=mode, grad=name, tile_rel_l2=l2(t), row_rel_l2=l2(r),
                                 tile_max=mx(t), row_max=mx(r)))
                print(f"D={dim} mode {mode} {name}: rel-L2 {l2(t):.3e} -> {l2(r):.3e} ({l2(r) / l2(t):.3f}x), "
                      f"max {mx(t):.3e} -> {mx(r):.3e} ({mx(r) / mx(t):.3f}x)", flush=True)
    with open(args.out, "w") as handle:
        json.dump(dict(lengths=LENGTHS, heads=2, inputs="bf16 randn", rows=rows), handle, indent=1)


if __name__ == "__main__":
    main()
