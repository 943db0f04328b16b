"""Time the FP8 backward at each launch layout, with and without TMA operands (GPU, one process).

Per shape (B sequences of N tokens, H=4, causal) and ``fp8_quant_mode``: the whole FP8
backward (``fp8_bwd``: the four re-quantizations, the transposed copies and every launch) with
each backward config pinned, its key-parallel operands read by pointer tensors or through TMA
descriptors, beside our bf16 backward (``hstu_bwd``, autotuned) in the same process. A config
that does not fit (shared memory) prints its error.

    python benchmarks/tools/fp8_bwd_configs.py --out fp8_bwd_configs.json [--shapes 8192x128,8192x256] [--modes 2,5] [--acc fast]

Config syntax: ``warps:stages[:split]`` for the key-parallel launch(es), ``/warps:stages`` for a
query-parallel dQ kernel (FP8 tiles are fixed by the definition).
"""

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402

CONFIGS = {
    128: ["8:2:split", "8:1:split", "8:2", "8:1", "8:1:split/8:1"],
    256: ["8:1:split", "8:1:split/8:1", "8:1", "8:1/8:1"],
}
#: Layouts with per-row P / dS scales (``fp8_bwd_row_scales``): dQ always by the dQ kernel.
ROW_SCALE_CONFIGS = ["8:3/4:3", "8:3/4:2", "8:4/4:2", "8:2/4:3", "8:2/4:2", "8:1:split/4:1"]


def parse_config(text: str):
    from torchrec_hstu.ops.triton.hstu_attention import KernelConfig

    main, _, dq_text = text.partition("/")
    fields = main.split(":")
    dq = None
    if dq_text:
        dwarps, dstages = map(int, dq_text.split(":"))
        dq = KernelConfig(0, 0, dwarps, dstages)
    return KernelConfig(0, 0, int(fields[0]), int(fields[1]), split_bwd=fields[-1] == "split", dq=dq)


def main() -> None:
    import triton

    from torchrec_hstu.ops.triton.fp8_attention import fp8_bwd, fp8_bwd_row_scales
    from torchrec_hstu.ops.triton.hstu_attention import hstu_bwd, mask_args_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="8192x128,4096x128,8192x256")
    parser.add_argument("--modes", default="2,5")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--acc", default="fast", help="fp8_accumulation")
    args = parser.parse_args()
    device = torch.device("cuda")
    mask = mask_args_of(AttentionOptions(), False)
    rows = []

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=80, return_mode="median")

    for shape in args.shapes.split(","):
        n, dim = map(int, shape.split("x"))
        batch, heads = args.batch, 4
        offsets = torch.tensor([0] + [n] * batch, device=device).cumsum(0)
        q, k, v, dout = (torch.empty(batch * n, heads, dim, device=device, dtype=torch.bfloat16).uniform_(-1, 1)
                         for _ in range(4))
        alpha = 1.0 / dim**0.5
        bf16_ms = bench(functools.partial(hstu_bwd, dout, q, k, v, offsets, None, n, alpha, n, mask))
        rows.append(dict(N=n, D=dim, kernel="bf16 hstu_bwd (autotuned)", ms=bf16_ms))
        print(rows[-1], flush=True)
        for mode in map(int, args.modes.split(",")):
            configs = ROW_SCALE_CONFIGS if fp8_bwd_row_scales(dim, dim, args.acc) else CONFIGS[dim]
            for text in configs:
                for tma in (False, True):
                    cfg = parse_config(text)
                    row = dict(N=n, D=dim, mode=mode, config=text, tma=tma)
                    try:
                        ms = bench(functools.partial(fp8_bwd, dout, q, k, v, offsets, None, n, alpha, n,
                                                     mask, mode, config=cfg, fp8_accumulation=args.acc,
                                                     tma=tma))
                        row.update(ms=ms, vs_bf16=bf16_ms / ms)
                    except Exception as err:  # noqa: BLE001 - a config that does not fit is a result
                        row.update(error=f"{type(err).__name__}: {str(err)[:160]}")
                    rows.append(row)
                    print(row, flush=True)
    with open(args.out, "w") as handle:
        json.dump(dict(device=torch.cuda.get_device_name(), command=" ".join(sys.argv), rows=rows), handle, indent=1)


if __name__ == "__main__":
    main()
