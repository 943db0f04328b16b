"""Benchmark + profile: the bf16 Triton backward's launch layouts side by side (GPU).

For each shape (causal, ``H`` heads of dim ``D``, ``B`` sequences of length ``N`` or jagged
lengths) and each backward config, in one process:

* the whole backward (``hstu_bwd`` with that config pinned: every launch it makes, dQ buffers
  and casts included), ``triton.testing.do_bench`` median, TFLOP/s on the issue's count
  (backward = 2.5x the causal forward ``4*H*D*sum(n(n+1)/2)``);
* a ``torch.profiler`` pass of 5 calls: GPU time per kernel name (where the time goes: the dV
  launch, the dK/dQ launch, the dQ kernel, the zero-fill and cast of the fp32 dQ accumulator);
* which config the autotuner picks among the launcher's candidates, and the forward's time;
* optionally (``--fp8-profile 8192x128:2``) FP8 forward+backward of the public kernel entry
  (quantization included) beside bf16, with the GPU time per kernel name.

Config syntax: ``bm:bn:warps:stages[:split]`` for the key-parallel launch(es) (``split``: dV
and dK in two launches), then optionally ``/bm:bn:warps:stages`` for a query-parallel dQ kernel
(no atomics). Default: the launcher's own candidates for each ``D``.

    python benchmarks/bwd_layouts.py --out results.json [--shapes 4096x256,8192x128:jagged]
"""

import argparse
import datetime
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402


def parse_config(text: str):
    from torchrec_hstu.ops.triton.hstu_attention import KernelConfig

    main, _, dq_text = text.partition("/")
    fields = main.split(":")
    bm, bn, warps, stages = map(int, fields[:4])
    split = len(fields) > 4 and fields[4] == "split"
    dq = None
    if dq_text:
        dbm, dbn, dwarps, dstages = map(int, dq_text.split(":"))
        dq = KernelConfig(dbm, dbn, dwarps, dstages)
    return KernelConfig(bm, bn, warps, stages, split_bwd=split, dq=dq)


def config_text(cfg) -> str:
    text = f"{cfg.block_m}:{cfg.block_n}:{cfg.num_warps}:{cfg.num_stages}" + (":split" if cfg.split_bwd else "")
    if cfg.dq is not None:
        text += f"/{cfg.dq.block_m}:{cfg.dq.block_n}:{cfg.dq.num_warps}:{cfg.dq.num_stages}"
    return text


def kernel_times_ms(fn, calls: int = 5) -> Dict[str, float]:
    """GPU milliseconds per call of ``fn`` by kernel name (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: Dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name if len(event.name) < 60 else event.name[:57] + "..."
            totals[name] += event.device_time_total / 1e3 / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def run_shape(n: int, dim: int, jagged: bool, heads: int, configs: Optional[List[str]]) -> dict:
    import triton

    from torchrec_hstu.ops.triton import hstu_attention as ta

    batch = 32 if n <= 2048 else 16
    gen = torch.Generator().manual_seed(0)
    lengths = [n] * batch
    if jagged:
        lengths = torch.randint(1, n + 1, (batch,), generator=gen).tolist()
        lengths[0] = n
    total = sum(lengths)
    device = torch.device("cuda")
    q, k, v, dout = (torch.randn(total, heads, dim, device=device, dtype=torch.bfloat16) * 0.5
                     for _ in range(4))
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    alpha = dim ** -0.5
    options = AttentionOptions()
    mask = ta.mask_args_of(options, False)
    scaling = options.resolve_scaling_seqlen(n)
    flops_fwd = 4.0 * heads * dim * sum(x * (x + 1) / 2 for x in lengths)
    row: dict = dict(n=n, d=dim, lengths="jagged" if jagged else "full", batch=batch, heads=heads)
    fwd = lambda: ta.hstu_fwd(q, k, v, offsets, None, n, alpha, scaling, mask)  # noqa: E731
    fwd()
    row["fwd_ms"] = triton.testing.do_bench(fwd, warmup=10, rep=50, return_mode="median")
    row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
    block = ta._block_dim(dim)
    candidates = [parse_config(c) for c in configs] if configs else ta.bwd_candidates(block, block, q.dtype)
    # The autotuner's own pick among the launcher's candidates.
    ta.clear_config_cache()
    ta.hstu_bwd(dout, q, k, v, offsets, None, n, alpha, scaling, mask)
    picked = [c for key, c in ta._config_cache.items() if key[0] == "bwd"]
    row["autotuned"] = config_text(picked[0]) if picked else None
    row["layouts"] = []
    want = None
    for cfg in candidates:
        call = lambda cfg=cfg: ta.hstu_bwd(dout, q, k, v, offsets, None, n, alpha, scaling, mask, config=cfg)  # noqa: E731
        entry: dict = dict(config=config_text(cfg))
        try:
            grads = call()
            if want is None:
                want = [g.float() for g in grads]
            entry["max_diff_vs_first"] = max(float((g.float() - w).abs().max()) for g, w in zip(grads, want))
            entry["bwd_ms"] = triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median")
            entry["bwd_tflops"] = 2.5 * flops_fwd / entry["bwd_ms"] / 1e9
            entry["fwd_bwd_tflops"] = 3.5 * flops_fwd / (entry["bwd_ms"] + row["fwd_ms"]) / 1e9
            entry["kernels_ms"] = kernel_times_ms(call)
        except Exception as err:  # a config that does not fit: recorded, the others go on
            entry["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        print(json.dumps(dict(shape=f"{n}x{dim}:{row['lengths']}", **entry)), flush=True)
        row["layouts"].append(entry)
    return row


def fp8_profile(n: int, dim: int, heads: int, mode: int) -> dict:
    """Where FP8 forward+backward time goes (``triton_fp8_hstu_attention``, quantization
    included), beside bf16 forward+backward of the same shape: do_bench medians and GPU time per
    kernel name."""
    import triton

    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention
    from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

    batch = 32 if n <= 2048 else 16
    device = torch.device("cuda")
    offsets = torch.tensor([0] + [n] * batch, device=device).cumsum(0)
    leaves = [(torch.randn(batch * n, heads, dim, device=device, dtype=torch.bfloat16) * 0.5)
              .requires_grad_() for _ in range(3)]
    dout = torch.randn(batch * n, heads, dim, device=device, dtype=torch.bfloat16) * 0.5
    alpha = dim ** -0.5
    row: dict = dict(n=n, d=dim, mode=mode, batch=batch)
    for name, fn, options in (("bf16", triton_hstu_attention, AttentionOptions()),
                              (f"fp8_mode{mode}", triton_fp8_hstu_attention,
                               AttentionOptions(fp8_quant_mode=mode))):
        def step(fn=fn, options=options):
            out = fn(*leaves, offsets, n, alpha, options)
            torch.autograd.grad(out, leaves, dout)
        step()
        ms = triton.testing.do_bench(step, warmup=5, rep=30, return_mode="median")
        row[name] = dict(fwd_bwd_ms=ms, kernels_ms=kernel_times_ms(step, calls=3))
        print(json.dumps(dict(fp8_profile=name, n=n, d=dim, ms=ms)), flush=True)
    row["fp8_over_bf16_speed"] = row["bf16"]["fwd_bwd_ms"] / row[f"fp8_mode{mode}"]["fwd_bwd_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="4096x256,8192x256,2048x256,4096x128,8192x128,4096x128:jagged")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--configs", default="", help="comma-separated configs (default: candidates)")
    parser.add_argument("--fp8-profile", default="", help="NxD:mode,... FP8 fwd+bwd profiles")
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c] or None
    rows = []
    fp8_rows = []
    for spec in filter(None, args.fp8_profile.split(",")):
        dims, _, mode = spec.partition(":")
        n, dim = map(int, dims.split("x"))
        fp8_rows.append(fp8_profile(n, dim, args.heads, int(mode or 2)))
    for shape in filter(None, args.shapes.split(",")):
        dims, _, kind = shape.partition(":")
        n, dim = map(int, dims.split("x"))
        rows.append(run_shape(n, dim, kind == "jagged", args.heads, configs))
    result = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                  torch=torch.__version__, command=" ".join(sys.argv), rows=rows, fp8_profiles=fp8_rows)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    for row in fp8_rows:
        print(f"FP8 mode {row['mode']} N={row['n']} D={row['d']}: fp8/bf16 fwd+bwd speed "
              f"{row['fp8_over_bf16_speed']:.2f}")
        for name in ("bf16", f"fp8_mode{row['mode']}"):
            top = ", ".join(f"{k} {v:.3f}" for k, v in list(row[name]["kernels_ms"].items())[:8])
            print(f"  {name}: {row[name]['fwd_bwd_ms']:.3f} ms | {top}")
    for row in rows:
        print(f"N={row['n']} D={row['d']} {row['lengths']}: fwd {row['fwd_ms']:.3f} ms "
              f"({row['fwd_tflops']:.0f} TFLOP/s), autotuned {row['autotuned']}")
        for entry in row["layouts"]:
            if "error" in entry:
                print(f"  {entry['config']:32s} {entry['error']}")
                continue
            top = ", ".join(f"{k} {v:.3f}" for k, v in list(entry["kernels_ms"].items())[:4])
            print(f"  {entry['config']:32s} bwd {entry['bwd_ms']:.3f} ms {entry['bwd_tflops']:.0f} TF/s "
                  f"fwd+bwd {entry['fwd_bwd_tflops']:.0f} TF/s | {top}")


if __name__ == "__main__":
    main()
