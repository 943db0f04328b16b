"""Time the bf16 Triton forward at each launch config, pinned (GPU, one process).

Which tile shape / warps / pipeline depth the forward kernel runs best at, per head dim and
sequence length, beside the autotuner's candidates (``fwd_candidates``), for B=16, H=4,
causal, full lengths. A config that does not fit (shared memory, registers) prints its error.

    python benchmarks/tools/fwd_configs.py --out fwd_configs.json [--dims 128,256] [--seq-lens 4096,8192]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402

#: bm:bn:warps:stages per padded head dim; the candidates first.
CONFIGS = {
    128: ["128:64:8:3", "128:128:8:3", "64:64:4:3", "128:64:8:4", "128:128:8:2", "128:32:8:4",
          "64:128:4:3", "64:64:4:4", "128:64:8:2", "256:64:8:2"],
    256: ["128:64:8:2", "128:32:8:3", "128:32:8:4", "128:64:8:1", "64:64:4:2", "64:32:4:3",
          "128:16:8:4", "64:64:8:2", "128:32:8:2"],
}


def main() -> None:
    import triton

    from torchrec_hstu.ops.triton.hstu_attention import KernelConfig, hstu_fwd, mask_args_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dims", default="128,256")
    parser.add_argument("--seq-lens", default="4096,8192")
    args = parser.parse_args()
    device = torch.device("cuda")
    mask = mask_args_of(AttentionOptions(), False)
    rows = []
    for dim in map(int, args.dims.split(",")):
        for n in map(int, args.seq_lens.split(",")):
            batch, heads = 16, 4
            offsets = torch.tensor([0] + [n] * batch, device=device).cumsum(0)
            q, k, v = (torch.empty(batch * n, heads, dim, device=device, dtype=torch.bfloat16).uniform_(-1, 1)
                       for _ in range(3))
            flops = 4 * heads * dim * batch * n * (n + 1) / 2
            for text in CONFIGS[dim]:
                bm, bn, warps, stages = map(int, text.split(":"))
                cfg = KernelConfig(bm, bn, warps, stages)
                row = dict(D=dim, N=n, config=text)
                try:
                    ms = triton.testing.do_bench(
                        lambda: hstu_fwd(q, k, v, offsets, None, n, 1.0 / dim**0.5, n, mask, config=cfg),
                        warmup=10, rep=60, return_mode="median")
                    row.update(ms=ms, tflops=flops / ms / 1e9)
                except Exception as err:  # noqa: BLE001 - a config that does not fit is a result
                    row.update(error=f"{type(err).__name__}: {str(err)[:120]}")
                rows.append(row)
                print(row, flush=True)
    with open(args.out, "w") as handle:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), handle, indent=1)


if __name__ == "__main__":
    main()
