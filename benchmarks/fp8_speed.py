"""FP8 HSTU attention on the GPU: fused Triton quantizers and the accumulation choices.

One run, side by side, on one CUDA device (meant for an H100, <= ~4 minutes):

(a) Triton quantizers == PyTorch quantizers (``ops/fp8/quantize.py``), bitwise on fp8 bytes and
    descales, every mode / variant, random jagged data (empty and length-1 sequences included)
    and mode 0 on out-of-range values.
(b) Quantizer time for q, k, v (the forward's three calls) at B=16, N=4096, H=4, D=128: torch
    vs Triton, full and jagged lengths.
(c) FP8 forward and forward+backward (quantization included) per ``fp8_accumulation`` choice vs
    our Triton bf16, N in {4096, 8192}, D=128, causal, modes 2, 5, 0, 3 (in that order; the
    script stops starting new cases when its time budget is spent and says so).
(d) Each accumulation choice's error (out, dq, dk, dv) vs the fp32 reference (bf16 inputs, next
    to the emulation's own error and as a ratio to it) and vs the PyTorch FP8 emulation (fp32
    inputs and outputs for both, so only the kernels' numerics differ, not output rounding).

Timings are ``triton.testing.do_bench`` medians (ms); FLOPs use the issue's causal formula.
A failing case prints its error and the run continues.

Usage::

    python benchmarks/fp8_speed.py --out $OUT            # writes <date>-<device>-fp8-speed.{json,md}
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import bench, causal_flops  # noqa: E402
from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402

ACCUMULATIONS = ("precise", "mixed", "fast")
#: (mode, colwise, block) of every quantizer call the FP8 kernels make.
VARIANTS = [(0, False, 128), (1, False, 128), (1, True, 128), (2, False, 64), (2, False, 128),
            (3, False, 128), (4, False, 128), (5, False, 128)]


def _lengths(batch: int, max_len: int, jagged: bool, gen: torch.Generator) -> List[int]:
    if not jagged:
        return [max_len] * batch
    return torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()


def _offsets(lengths: List[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0] + lengths, device=device).cumsum(0)


def _guard(name: str, results: List[Dict], fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the benchmark reports and continues
        print(f"  !! {name} failed: {type(err).__name__}: {err}", flush=True)
        traceback.print_exc(limit=3)
        results.append(dict(case=name, error=f"{type(err).__name__}: {err}"))


# ----------------------------------------------------------------------------- (a)
def check_quantizers(device: torch.device) -> List[Dict]:
    from torchrec_hstu.ops.fp8.quantize import quantize_for_mode
    from torchrec_hstu.ops.triton.fp8_quantize import torch_cast_saturates, triton_quantize_for_mode

    print(f"(a) Triton vs torch quantizers, bitwise (torch cast saturates: "
          f"{torch_cast_saturates(device)})", flush=True)
    rows = []
    gen = torch.Generator().manual_seed(0)
    cases = [([0, 1, 1000, 129, 128, 0, 257, 4096], 4, 128, torch.bfloat16, 1.0),
             ([5, 0, 1, 700, 64], 2, 64, torch.float16, 1e-3),
             ([300, 1, 0, 2000], 4, 256, torch.float32, 20.0)]
    for lengths, heads, dim, dtype, scale in cases:
        offsets = _offsets(lengths, device)
        x = (torch.randn(sum(lengths), heads, dim, generator=gen) * scale).to(device, dtype)
        for mode, colwise, block in VARIANTS:
            name = f"mode{mode}{'col' if colwise else ''}_b{block}_D{dim}_{str(dtype)[6:]}"

            def one() -> None:
                ref = quantize_for_mode(x, offsets, mode, block, colwise=colwise)
                got = triton_quantize_for_mode(x, offsets, mode, block, colwise=colwise, exact=True,
                                               max_seq_len=max(lengths))
                bad = int((got.values.view(torch.uint8) != ref.values.view(torch.uint8)).sum())
                same = dict(
                    bytes_differing=bad,
                    descale=bool(got.descale.shape == ref.descale.shape
                                 and torch.equal(got.descale.view(torch.int32), ref.descale.view(torch.int32))),
                    token_descale=bool(got.token_descale.shape == ref.token_descale.shape
                                       and torch.equal(got.token_descale, ref.token_descale)),
                )
                ok = bad == 0 and same["descale"] and same["token_descale"]
                rows.append(dict(case=name, ok=ok, **same))
                if not ok:
                    print(f"  MISMATCH {name}: {same}", flush=True)

            _guard(name, rows, one)
    # Mode 0: values out of the e4m3 range and every rounding midpoint.
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    extra = torch.tensor([464.0, 464.01, 470.0, 480.0, 1e6, float("inf"), float("nan")])
    vals = torch.cat([mids, mids.nextafter(torch.tensor(1e30)), mids.nextafter(torch.tensor(-1e30)),
                      extra, -extra]).view(-1, 1, 1).to(device)

    def edges() -> None:
        off = torch.tensor([0, vals.shape[0]], device=device)
        ref = quantize_for_mode(vals, off, 0, 128).values.view(torch.uint8)
        got = triton_quantize_for_mode(vals, off, 0, 128, exact=True).values.view(torch.uint8)
        bad = int((ref != got).sum())
        rows.append(dict(case="mode0_cast_edges", ok=bad == 0, bytes_differing=bad))
        if bad:
            print(f"  MISMATCH mode0 cast edges: {bad} bytes", flush=True)

    _guard("mode0_cast_edges", rows, edges)
    n_ok = sum(1 for r in rows if r.get("ok"))
    print(f"  {n_ok}/{len(rows)} cases bit-identical", flush=True)
    return rows


# ----------------------------------------------------------------------------- (b)
def time_quantizers(device: torch.device, batch: int = 16, max_len: int = 4096, heads: int = 4,
                    dim: int = 128) -> List[Dict]:
    from torchrec_hstu.ops.fp8.quantize import FP8TileSizes, quantize_for_mode
    from torchrec_hstu.ops.triton.fp8_quantize import triton_quantize_for_mode

    print(f"(b) quantize q, k, v (forward calls), B={batch} N={max_len} H={heads} D={dim}", flush=True)
    tiles = FP8TileSizes.for_head_dim(dim)
    rows = []
    gen = torch.Generator().manual_seed(1)
    for jagged in (False, True):
        lengths = _lengths(batch, max_len, jagged, gen)
        offsets = _offsets(lengths, device)
        q, k, v = (torch.randn(sum(lengths), heads, dim, device=device, dtype=torch.bfloat16)
                   for _ in range(3))
        for mode in range(6):
            def qkv(fn, **kw):
                return lambda: (fn(q, offsets, mode, tiles.fwd_block_m, **kw),
                                fn(k, offsets, mode, tiles.fwd_block_n, **kw),
                                fn(v, offsets, mode, tiles.fwd_block_n, colwise=True, **kw))

            name = f"quant_mode{mode}_{'jagged' if jagged else 'full'}"

            def one() -> None:
                t_torch = bench(qkv(quantize_for_mode))
                t_triton = bench(qkv(triton_quantize_for_mode, max_seq_len=max_len))
                rows.append(dict(case=name, mode=mode, lengths="jagged" if jagged else "full",
                                 tokens=sum(lengths), torch_ms=t_torch, triton_ms=t_triton,
                                 speedup=t_torch / t_triton))
                print(f"  {name:>24s} torch {t_torch:8.3f} ms  triton {t_triton:7.3f} ms  "
                      f"{t_torch / t_triton:6.1f}x", flush=True)

            _guard(name, rows, one)
    return rows


# ----------------------------------------------------------------------------- (c)
def time_attention(device: torch.device, seq_lens: List[int], modes: List[int], deadline: float,
                   batch: int = 16, heads: int = 4, dim: int = 128) -> List[Dict]:
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention
    from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

    print(f"(c) attention fwd / fwd+bwd, B={batch} H={heads} D={dim}, causal, full lengths", flush=True)
    rows = []
    alpha = 1.0 / dim**0.5
    for max_len in seq_lens:
        offsets = _offsets([max_len] * batch, device)
        total = batch * max_len
        q, k, v, dout = (torch.empty(total, heads, dim, device=device, dtype=torch.bfloat16).uniform_(-1, 1)
                         for _ in range(4))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        flops = causal_flops([max_len] * batch, heads, dim)
        base: Dict[str, float] = {}

        def timed(name: str, entry: Callable, options: AttentionOptions, **kw) -> None:
            def fwd():
                return entry(q, k, v, offsets, max_len, alpha, options, **kw)

            def fwd_bwd():
                torch.autograd.grad(entry(*leaves, offsets, max_len, alpha, options, **kw), leaves, dout)

            fwd()
            fwd_bwd()
            if device.type == "cuda":
                torch.cuda.synchronize()
            for direction, fn, mult in (("fwd", fwd, 1.0), ("fwd_bwd", fwd_bwd, 3.5)):
                ms = bench(fn)
                row = dict(N=max_len, B=batch, H=heads, D=dim, impl=name, direction=direction, ms=ms,
                           tflops=flops * mult / ms / 1e9)
                if name == "triton_bf16":
                    base[direction] = ms
                elif direction in base:
                    row["speedup_vs_bf16"] = base[direction] / ms
                rows.append(row)
                extra = f" {row['speedup_vs_bf16']:5.2f}x bf16" if "speedup_vs_bf16" in row else ""
                print(f"  N={max_len} {name:>26s} {direction:>7s} {ms:9.3f} ms {row['tflops']:7.1f} "
                      f"TFLOP/s{extra}", flush=True)

        _guard(f"N{max_len}_bf16", rows, lambda: timed("triton_bf16", triton_hstu_attention, AttentionOptions()))
        for mode in modes:
            for acc in ACCUMULATIONS:
                name = f"fp8_mode{mode}_{acc}"
                if time.time() > deadline:
                    print(f"  N={max_len} {name}: skipped (time budget)", flush=True)
                    rows.append(dict(N=max_len, impl=name, skipped="time budget"))
                    continue
                _guard(f"N{max_len}_{name}", rows,
                       lambda: timed(name, triton_fp8_hstu_attention,
                                     AttentionOptions(fp8_quant_mode=mode), fp8_accumulation=acc))
        del q, k, v, dout, leaves
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- (d)
def measure_errors(device: torch.device, modes: List[int], deadline: float,
                   lengths: Optional[List[int]] = None, heads: int = 4, dim: int = 128) -> List[Dict]:
    from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated
    from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention

    lengths = lengths or [1000, 1, 0, 517, 256, 64, 999, 300]
    print(f"(d) errors, rel-L2 (max-abs / max|ref|), lengths {lengths}, H={heads} D={dim}, causal",
          flush=True)
    gen = torch.Generator(device=device).manual_seed(7)
    offsets = _offsets(lengths, device)
    total, max_len, alpha = sum(lengths), max(lengths), 0.125

    def rand() -> torch.Tensor:
        return (torch.rand(total, heads, dim, device=device, generator=gen) * 2 - 1).to(torch.bfloat16)

    q, k, v, dout = rand(), rand(), rand(), rand()

    def run(fn, dtype, options, **kw) -> List[torch.Tensor]:
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, offsets, max_len, alpha, options, **kw)
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
        return [t.detach().double() for t in [out, *grads]]

    def err(x: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
        return dict(rel_l2=float((x - ref).norm() / ref.norm().clamp_min(1e-30)),
                    max_rel=float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))

    names = ("out", "dq", "dk", "dv")
    ref = run(pytorch_hstu_attention, torch.float32, AttentionOptions())
    rows = []
    for mode in modes:
        if time.time() > deadline:
            print(f"  mode {mode}: skipped (time budget)", flush=True)
            rows.append(dict(mode=mode, skipped="time budget"))
            continue
        options = AttentionOptions(fp8_quant_mode=mode)
        emu: List[torch.Tensor] = []
        emu32: List[torch.Tensor] = []

        def emulation() -> None:
            emu.extend(run(fp8_hstu_attention_emulated, torch.bfloat16, options))
            emu32.extend(run(fp8_hstu_attention_emulated, torch.float32, options))
            row = dict(mode=mode, impl="emulation")
            for name, x, r in zip(names, emu, ref):
                row[f"{name}_vs_ref"] = err(x, r)
            rows.append(row)
            print(f"  mode {mode} {'emulation':>9s} vs ref: " + "  ".join(
                f"{n} {row[f'{n}_vs_ref']['rel_l2']:.3e}" for n in names), flush=True)

        _guard(f"errors_mode{mode}_emulation", rows, emulation)
        for acc in ACCUMULATIONS:
            def one() -> None:
                got = run(triton_fp8_hstu_attention, torch.bfloat16, options, fp8_accumulation=acc)
                got32 = run(triton_fp8_hstu_attention, torch.float32, options, fp8_accumulation=acc)
                row = dict(mode=mode, impl=f"triton_{acc}")
                for i, name in enumerate(names):
                    row[f"{name}_vs_ref"] = err(got[i], ref[i])
                    if emu:
                        row[f"{name}_ratio_to_emulation_error"] = (
                            row[f"{name}_vs_ref"]["rel_l2"] / max(err(emu[i], ref[i])["rel_l2"], 1e-30))
                    if emu32:
                        row[f"{name}_vs_emulation"] = err(got32[i], emu32[i])
                rows.append(row)
                print(f"  mode {mode} {acc:>9s} vs ref: " + "  ".join(
                    f"{n} {row[f'{n}_vs_ref']['rel_l2']:.3e}" for n in names)
                    + " | vs emu (fp32 in): " + "  ".join(
                    f"{n} {row.get(f'{n}_vs_emulation', {}).get('rel_l2', float('nan')):.1e}" for n in names),
                    flush=True)

            _guard(f"errors_mode{mode}_{acc}", rows, one)
    return rows


# ----------------------------------------------------------------------------- report
def _markdown(meta: Dict, check: List[Dict], quant: List[Dict], att: List[Dict], errs: List[Dict]) -> str:
    lines = [f"# FP8 speed: Triton quantizers and accumulation choices ({meta['date']}, {meta['device']})",
             "", f"Command: `{meta['command']}`", "",
             f"torch {meta['torch']}, Triton {meta['triton']}, CUDA {meta['cuda']}. Timings: do_bench "
             "medians (ms). FLOPs = 4*H*D*sum(n(n+1)/2) forward, 3.5x forward+backward.", "",
             "## (a) Triton quantizers vs torch quantizers (bitwise)", "",
             f"{sum(1 for r in check if r.get('ok'))}/{len(check)} cases bit-identical "
             f"(torch cast saturates: {meta.get('torch_cast_saturates')}).", ""]
    bad = [r for r in check if not r.get("ok")]
    if bad:
        lines += ["| case | result |", "|---|---|"] + [f"| {r['case']} | {r} |" for r in bad] + [""]
    lines += ["## (b) quantize q, k, v (forward calls), B=16, N=4096, H=4, D=128", "",
              "| mode | lengths | tokens | torch ms | Triton ms | speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['lengths']} | {r['tokens']} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} "
              f"| {r['speedup']:.1f}x |" for r in quant if "torch_ms" in r]
    lines += ["", "## (c) attention, B=16, H=4, D=128, causal, full lengths (quantization included)", "",
              "| N | impl | dir | ms | TFLOP/s | vs our bf16 |", "|---|---|---|---|---|---|"]
    for r in att:
        if "ms" in r:
            sp = f"{r['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in r else ""
            lines.append(f"| {r['N']} | {r['impl']} | {r['direction']} | {r['ms']:.3f} | {r['tflops']:.1f} | {sp} |")
        elif "skipped" in r:
            lines.append(f"| {r['N']} | {r['impl']} | - | skipped ({r['skipped']}) | | |")
    lines += ["", "## (d) errors (relative L2) vs the fp32 reference and vs the emulation", "",
              "vs ref: bf16 inputs, vs the fp32 PyTorch reference. vs emu: fp32 inputs, Triton FP8 vs the "
              "PyTorch FP8 emulation (same fp8 products; differences are summation order and accumulation).", "",
              "| mode | impl | out vs ref | dq vs ref | dk vs ref | dv vs ref | out vs emu | dq vs emu | dk vs emu | dv vs emu |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in errs:
        if "impl" not in r:
            continue
        cells = [f"{r[f'{n}_vs_ref']['rel_l2']:.3e}" for n in ("out", "dq", "dk", "dv")]
        cells += [f"{r[f'{n}_vs_emulation']['rel_l2']:.1e}" if f"{n}_vs_emulation" in r else ""
                  for n in ("out", "dq", "dk", "dv")]
        lines.append(f"| {r['mode']} | {r['impl']} | " + " | ".join(cells) + " |")
    failures = [r for r in check + quant + att + errs if "error" in r]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {r['case']}: {r['error']}" for r in failures]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the .json and .md results")
    parser.add_argument("--seq-lens", default="4096,8192")
    parser.add_argument("--modes", default="2,5,0,3", help="FP8 modes for (c) and (d), in priority order")
    parser.add_argument("--budget-s", type=float, default=190.0,
                        help="stop starting new (c)/(d) cases after this many seconds")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_speed.py needs a CUDA device")
    import triton

    start = time.time()
    deadline = start + args.budget_s
    device = torch.device("cuda")
    dev_name = torch.cuda.get_device_name(device)
    date = datetime.date.today().isoformat()
    modes = [int(m) for m in args.modes.split(",") if m]
    seq_lens = [int(n) for n in args.seq_lens.split(",") if n]
    from torchrec_hstu.ops.triton.fp8_quantize import torch_cast_saturates

    meta = dict(date=date, device=dev_name, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                command="python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
                torch_cast_saturates=torch_cast_saturates(device))
    check = check_quantizers(device)
    quant = time_quantizers(device)
    # (d) before the N=8192 part of (c): the error trade matters more than the second N.
    att = time_attention(device, seq_lens[:1], modes, deadline - 60.0)
    errs = measure_errors(device, modes, deadline - 30.0)
    att += time_attention(device, seq_lens[1:], modes, deadline)
    meta["wall_s"] = round(time.time() - start, 1)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{date}-{dev_name.replace(' ', '-')}-fp8-speed")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, check=check, quantizers=quant, attention=att, errors=errs), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(meta, check, quant, att, errs))
    print(f"wrote {stem}.json / .md ({meta['wall_s']} s)", flush=True)


if __name__ == "__main__":
    main()
