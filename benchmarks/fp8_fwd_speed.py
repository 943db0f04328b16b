"""FP8 Triton forward on the GPU (issue 19): kernel alone, end to end, quantizers, accuracy.

One device call (<= ~4.5 minutes), in this order, each part printing as it goes and stopping new
cases when ``--budget`` seconds are spent:

(a) Accuracy, forward (bf16 inputs ``U(-1, 1)`` and ``N(0, 1)``, lengths
    [1000, 1, 0, 517, 256, 64, 999, 300], H=4, D=128, causal, modes 2, 5, 1, 0): relative L2
    of the Triton FP8 output vs the float64 PyTorch reference, next to the PyTorch FP8 emulation's
    (ratio; the bound is 1.1x), per ``fp8_accumulation``; and Triton vs the emulation on fp32
    inputs ("precise" must agree to ~1e-4).
(b) Kernel-only forward (q, k, v already quantized and v laid out) vs our bf16 Triton forward,
    B=16, H=4, D=128, causal, full lengths, N in {4096, 8192}, modes 2 and 5: each ``"fast"``
    tile config and ``"precise"``; end to end (quantization included, default accumulation).
(c) Quantizers: q, k, v quantization (and the v transposition) in GB/s (bytes read + written).
(d) Optional fwd+bwd end to end at N=8192 (default accumulation) if budget remains.
(e) End-to-end forward per head dim (``--dims``), default quantizers beside the earlier ones
    (integer cast, division), vs bf16.

Timings: ``triton.testing.do_bench`` medians (ms). FLOPs: causal ``4*H*D*sum(n(n+1)/2)``.

Usage::

    python benchmarks/fp8_fwd_speed.py --out $OUT [--budget 250]
"""

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402

ROWS: List[Dict] = []
T0 = time.time()


def bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn) -> float:
    """Median GPU time of ``fn`` replayed from a CUDA graph (no host launch gaps)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def causal_flops(lengths: List[int], heads: int, dim: int) -> float:
    return float(sum(4 * heads * dim * n * (n + 1) / 2 for n in lengths))


def record(**row) -> None:
    row["t"] = round(time.time() - T0, 1)
    ROWS.append(row)
    print("  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items()), flush=True)


def guard(name: str, fn) -> None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - report and continue
        print(f"  !! {name} failed: {type(err).__name__}: {err}", flush=True)
        traceback.print_exc(limit=4)
        ROWS.append(dict(case=name, error=f"{type(err).__name__}: {err}"))


def _config_cache():
    from torchrec_hstu.ops.triton import hstu_attention

    return getattr(hstu_attention, "_config_cache", {})


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).norm().item() / max(ref.double().norm().item(), 1e-30)


# ----------------------------------------------------------------------------- (a)
def accuracy(device, deadline: float, modes: List[int]) -> None:
    from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated
    from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention

    lengths = [1000, 1, 0, 517, 256, 64, 999, 300]
    heads, dim, max_len = 4, 128, max(lengths)
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    total = sum(lengths)
    alpha = 1.0 / dim**0.5
    print("(a) forward accuracy vs float64 reference", flush=True)
    for dist in ("uniform", "normal"):
        gen = torch.Generator(device=device).manual_seed(1 if dist == "uniform" else 2)

        def draw():
            x = torch.empty(total, heads, dim, device=device)
            if dist == "uniform":
                x.uniform_(-1, 1, generator=gen)
            else:
                x.normal_(generator=gen)
            return x

        q32, k32, v32 = draw(), draw(), draw()
        q, k, v = (x.to(torch.bfloat16) for x in (q32, k32, v32))
        ref = pytorch_hstu_attention(q.double(), k.double(), v.double(), offsets, max_len, alpha,
                                     AttentionOptions())
        for mode in modes:
            if time.time() > deadline:
                print(f"  accuracy mode {mode}: skipped (budget)", flush=True)
                continue
            opts = AttentionOptions(fp8_quant_mode=mode)

            def one() -> None:
                emu = fp8_hstu_attention_emulated(q, k, v, offsets, max_len, alpha, opts)
                emu32 = fp8_hstu_attention_emulated(q32, k32, v32, offsets, max_len, alpha, opts)
                emu_err = rel_l2(emu, ref)
                for acc in ("fast", "precise"):
                    out = triton_fp8_hstu_attention(q, k, v, offsets, max_len, alpha, opts,
                                                    fp8_accumulation=acc)
                    out32 = triton_fp8_hstu_attention(q32, k32, v32, offsets, max_len, alpha, opts,
                                                      fp8_accumulation=acc)
                    err = rel_l2(out, ref)
                    record(part="a", dist=dist, mode=mode, acc=acc, err_vs_ref=err,
                           emu_err_vs_ref=emu_err, ratio=err / emu_err,
                           vs_emu_fp32=rel_l2(out32, emu32),
                           nan=bool(torch.isnan(out).any().item()))

            guard(f"accuracy_{dist}_m{mode}", one)


# ----------------------------------------------------------------------------- (b)
def speed(device, deadline: float, seq_lens: List[int], modes: List[int], configs: List[str],
          dim: int = 128) -> None:
    from torchrec_hstu.ops.triton import fp8_attention as fa
    from torchrec_hstu.ops.triton.hstu_attention import mask_args_of, triton_hstu_attention

    batch, heads = 16, 4
    alpha = 1.0 / dim**0.5
    print(f"(b) forward speed B={batch} H={heads} D={dim} causal full lengths", flush=True)
    mask = mask_args_of(AttentionOptions(), False)
    for n in seq_lens:
        lengths = [n] * batch
        offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
        total = batch * n
        flops = causal_flops(lengths, heads, dim)
        q, k, v = (torch.empty(total, heads, dim, device=device, dtype=torch.bfloat16).uniform_(-1, 1)
                   for _ in range(3))
        bf16_ms = bench(lambda: triton_hstu_attention(q, k, v, offsets, n, alpha, AttentionOptions()))
        record(part="b", D=dim, N=n, impl="bf16", ms=bf16_ms, tflops=flops / bf16_ms / 1e9)
        for mode in modes:
            inputs = fa.fp8_fwd_quantize(q, k, v, offsets, n, mode)
            torch.cuda.synchronize()
            cases = [("fast", c, {}) for c in configs] + [("precise", "128:8:2", {})]
            if mode == 2:
                # One change at a time off the default (A/B of where the time goes).
                cases += [("fast", c, dict(RESCALE=True)) for c in configs[:2]]
                cases += [("mixed", "128:8:2", {})]
            for acc, cfg, overrides in cases:
                if time.time() > deadline:
                    print(f"  N={n} mode {mode} {acc} {cfg}: skipped (budget)", flush=True)
                    continue
                fields = list(map(int, cfg.split(":")))
                config = fa.FP8KernelConfig(fields[0], 0, fields[1], fields[2],
                                            maxnreg=fields[3] if len(fields) > 3 else None)

                def one() -> None:
                    def run():
                        return fa.fp8_fwd_kernel(inputs, torch.bfloat16, offsets, None, n, alpha, n,
                                                 mask, mode, config, acc)

                    fa._FWD_OVERRIDES.clear()
                    fa._FWD_OVERRIDES.update(overrides)
                    try:
                        run()
                        ms = bench(run)
                    finally:
                        fa._FWD_OVERRIDES.clear()
                    record(part="b", D=dim, N=n, impl=f"fp8_m{mode}_{acc}_kernel", cfg=cfg,
                           overrides=str(overrides) if overrides else "", ms=ms,
                           tflops=flops / ms / 1e9, vs_bf16=bf16_ms / ms)

                guard(f"speed_N{n}_m{mode}_{acc}_{cfg}", one)
            if time.time() > deadline:
                continue

            def e2e() -> None:
                opts = AttentionOptions(fp8_quant_mode=mode)
                run = lambda: fa.triton_fp8_hstu_attention(q, k, v, offsets, n, alpha, opts)  # noqa: E731
                run()
                ms = bench(run)
                record(part="b", N=n, impl=f"fp8_m{mode}_default_e2e", ms=ms,
                       tflops=flops / ms / 1e9, vs_bf16=bf16_ms / ms,
                       autotuned=str([cfg_ for key_, cfg_ in _config_cache().items()
                                      if key_[0] == "fp8_fwd" and key_[1] == mode]))
                quant = lambda: fa.fp8_fwd_quantize(q, k, v, offsets, n, mode)  # noqa: E731
                quant_ms = bench(quant)
                record(part="b", N=n, impl=f"fp8_m{mode}_quantize_qkv_plus_vt", ms=quant_ms,
                       graph_ms=bench_graph(quant))
                graph_ms = bench_graph(run)
                record(part="b", N=n, impl=f"fp8_m{mode}_default_e2e_graph", ms=graph_ms,
                       tflops=flops / graph_ms / 1e9, vs_bf16=bf16_ms / graph_ms)

            guard(f"e2e_N{n}_m{mode}", e2e)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- (c)
def quantizers(device, deadline: float, modes: List[int]) -> None:
    from torchrec_hstu.ops.triton import fp8_attention as fa
    from torchrec_hstu.ops.triton.fp8_quantize import triton_quantize_for_mode

    batch, heads, dim, n = 16, 4, 128, 4096
    offsets = torch.tensor([0] + [n] * batch, device=device).cumsum(0)
    x = torch.empty(batch * n, heads, dim, device=device, dtype=torch.bfloat16).uniform_(-1, 1)
    print("(c) quantizers, one [65536, 4, 128] bf16 tensor", flush=True)
    from torchrec_hstu.ops.triton import fp8_quantize

    # Each mode: the path before 2026-12-03 (integer cast, division), the hardware cast with
    # division (``exact=True``), today's default (hardware cast, reciprocal multiply); then
    # pieces of the sequence kernel and other launch shapes.
    before = dict(hw_cast=False, recip=False)
    variants = []
    for m in modes:
        variants += [(before, m), (dict(recip=False), m), ({}, m)]
    for m in (2, 1, 3):
        variants += [(dict(sub_t=32), m), (dict(sub_t=128), m)]
    variants += [(dict(sub_t=64, seq_warps=4), 2), (dict(rows=64), 5), (dict(rows=64, rows_warps=4), 0)]
    exact: Dict = {}
    for tuning, mode in variants:
        for colwise, block in ((False, 128), (True, 128)):
            if colwise and mode != 1:
                continue
            if time.time() > deadline:
                continue

            def one() -> None:
                def run():
                    return triton_quantize_for_mode(x, offsets, mode, block, colwise=colwise, max_seq_len=n)

                fp8_quantize._TUNING.clear()
                fp8_quantize._TUNING.update(tuning)
                try:
                    res = run()
                    ms = bench(run)
                    graph_ms = bench_graph(run)
                finally:
                    fp8_quantize._TUNING.clear()
                key = (mode, colwise)
                if key not in exact:
                    fp8_quantize._TUNING.update(before)
                    try:
                        exact[key] = run().values.view(torch.uint8)
                    finally:
                        fp8_quantize._TUNING.clear()
                differ = int((res.values.view(torch.uint8) != exact[key]).sum().item())
                td = res.token_descale
                written = res.values.numel() + res.descale.numel() * 4
                if td.stride(0) != 0 and td.stride(1) != 0:
                    written += td.numel() * 4
                nbytes = x.numel() * 2 + written
                # Bytes the kernels move: modes 3, 4, 5 read x twice (amax pass, quantize pass).
                moved = nbytes + (x.numel() * 2 if mode in (3, 4, 5) else 0)
                record(part="c", mode=mode, colwise=colwise, tuning=str(tuning), ms=ms,
                       GBps=nbytes / ms / 1e6, graph_ms=graph_ms,
                       graph_GBps=nbytes / graph_ms / 1e6, graph_GBps_moved=moved / graph_ms / 1e6,
                       bytes_differing_from_exact=differ)

            guard(f"quant_m{mode}_{colwise}_{tuning}", one)
    x8 = x.to(torch.float8_e4m3fn)

    def vt() -> None:
        ms = bench(lambda: fa._transposed_aligned(x8, offsets, n))
        record(part="c", op="v_transpose_aligned", ms=ms, GBps=2 * x8.numel() / ms / 1e6)
        ms = bench(lambda: fa._transposed(x8))
        record(part="c", op="v_transpose_permute_contiguous", ms=ms, GBps=2 * x8.numel() / ms / 1e6)

    guard("vt", vt)
    copy_ms = bench(lambda: x.clone())
    record(part="c", op="bf16_clone_ceiling", ms=copy_ms, GBps=2 * x.numel() * 2 / copy_ms / 1e6)


# ----------------------------------------------------------------------------- (e)
def e2e_dims(device, deadline: float, modes: List[int], dims: List[int], seq_lens: List[int]) -> None:
    """End-to-end FP8 forward (quantization included) vs our bf16 forward per head dim, with
    the default quantizers and with the quantizers as they were before 2026-12-03 (integer
    cast, division) side by side."""
    from torchrec_hstu.ops.triton import fp8_attention as fa
    from torchrec_hstu.ops.triton import fp8_quantize
    from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

    batch, heads = 16, 4
    for dim in dims:
        for n in seq_lens:
            if time.time() > deadline:
                continue
            alpha = 1.0 / dim**0.5
            lengths = [n] * batch
            offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
            flops = causal_flops(lengths, heads, dim)
            q, k, v = (torch.empty(batch * n, heads, dim, device=device, dtype=torch.bfloat16).uniform_(-1, 1)
                       for _ in range(3))
            bf16_ms = bench(lambda: triton_hstu_attention(q, k, v, offsets, n, alpha, AttentionOptions()))
            record(part="e", D=dim, N=n, impl="bf16", ms=bf16_ms, tflops=flops / bf16_ms / 1e9)
            for mode in modes:
                for tuning in ({}, dict(hw_cast=False, recip=False)):
                    def one() -> None:
                        opts = AttentionOptions(fp8_quant_mode=mode)
                        run = lambda: fa.triton_fp8_hstu_attention(q, k, v, offsets, n, alpha, opts)  # noqa: E731
                        quant = lambda: fa.fp8_fwd_quantize(q, k, v, offsets, n, mode)  # noqa: E731
                        fp8_quantize._TUNING.clear()
                        fp8_quantize._TUNING.update(tuning)
                        try:
                            run()
                            ms = bench(run)
                            quant_ms = bench(quant)
                        finally:
                            fp8_quantize._TUNING.clear()
                        record(part="e", D=dim, N=n, impl=f"fp8_m{mode}_e2e", tuning=str(tuning), ms=ms,
                               quantize_qkv_ms=quant_ms, tflops=flops / ms / 1e9, vs_bf16=bf16_ms / ms)

                    guard(f"e2e_D{dim}_N{n}_m{mode}_{tuning}", one)
            del q, k, v
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- (d)
def fwd_bwd(device, deadline: float, modes: List[int]) -> None:
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention
    from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

    batch, heads, dim, n = 16, 4, 128, 8192
    alpha = 1.0 / dim**0.5
    offsets = torch.tensor([0] + [n] * batch, device=device).cumsum(0)
    total = batch * n
    flops = causal_flops([n] * batch, heads, dim) * 3.5
    q, k, v, dout = (torch.empty(total, heads, dim, device=device, dtype=torch.bfloat16).uniform_(-1, 1)
                     for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    print(f"(d) fwd+bwd N={n}", flush=True)

    def timed(name, entry, opts):
        def run():
            torch.autograd.grad(entry(*leaves, offsets, n, alpha, opts), leaves, dout)

        run()
        return bench(run)

    base = timed("bf16", triton_hstu_attention, AttentionOptions())
    record(part="d", N=n, impl="bf16_fwd_bwd", ms=base, tflops=flops / base / 1e9)
    for mode in modes:
        if time.time() > deadline:
            continue

        def one() -> None:
            ms = timed("fp8", triton_fp8_hstu_attention, AttentionOptions(fp8_quant_mode=mode))
            record(part="d", N=n, impl=f"fp8_m{mode}_default_fwd_bwd", ms=ms, tflops=flops / ms / 1e9,
                   vs_bf16=base / ms)

        guard(f"fwd_bwd_m{mode}", one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--budget", type=float, default=250.0)
    parser.add_argument("--parts", default="b,a,c,d")
    parser.add_argument("--configs", default="64:4:3,128:8:3,64:4:2:168,64:4:2,128:8:2")
    parser.add_argument("--seq-lens", default="4096,8192")
    parser.add_argument("--dims", default="128,256", help="head dims of part e")
    parser.add_argument("--speed-dim", type=int, default=128, help="head dim of part b")
    args = parser.parse_args()
    device = torch.device("cuda")
    deadline = T0 + args.budget
    import triton

    header = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, command=" ".join(sys.argv))
    print(header, flush=True)
    parts = args.parts.split(",")
    for part in parts:
        if part == "b":
            speed(device, deadline, [int(x) for x in args.seq_lens.split(",")], [2, 5],
                  args.configs.split(","), args.speed_dim)
        elif part == "a":
            accuracy(device, deadline, [2, 5, 1])
        elif part == "c":
            quantizers(device, deadline, [2, 5, 1, 0, 3, 4])
        elif part == "d":
            fwd_bwd(device, deadline, [2, 5])
        elif part == "e":
            e2e_dims(device, deadline, [2, 5], [int(x) for x in args.dims.split(",")],
                     [int(x) for x in args.seq_lens.split(",")])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_fwd_speed.json"), "w") as handle:
        json.dump(dict(header=header, rows=ROWS), handle, indent=1)
    print("SUMMARY")
    for row in ROWS:
        if row.get("part") in ("b", "d", "e") or "error" in row:
            print(" ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
