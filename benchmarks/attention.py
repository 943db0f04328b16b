"""Benchmark: Triton HSTU attention (bf16 and FP8) vs SDPA flash and the PyTorch reference.

Side by side in one run, causal attention, ``H`` heads of dim ``D``, ``B`` sequences of length
``N`` ("full") or of lengths drawn uniformly from ``[1, N]`` ("jagged"):

* ours bf16 forward and forward+backward (``kernel=TRITON``);
* ours FP8 forward and forward+backward per ``fp8_quant_mode`` (quantization included);
* the PyTorch reference forward (where it fits the time budget);
* the public path, ``hstu_mha(kernel=TRITON)`` (input checks included: once per batch, and a
  fresh batch every call), beside the kernel entry;
* FBGEMM's CUTLASS HSTU kernels (``fbgemm_gpu.experimental.hstu``, when the wheel imports):
  bf16 forward and forward+backward, per-tensor FP8 forward, through our CUTLASS backend;
* ``scaled_dot_product_attention`` with the flash backend, bf16, causal, on padded dense
  ``[B, H, N, D]`` tensors (the tuned-attention yardstick; for jagged batches it pays for the
  padding, which is how one would run it).

FLOPs count the useful causal work only: ``4 * H * D * sum(n * (n + 1) / 2)`` forward and 3.5x
that forward+backward, for every implementation. Times are medians of ``triton.testing.do_bench``.

Usage::

    python benchmarks/attention.py --out-dir benchmarks/results [--quick] [--fp8-modes 0,1,2,3,4,5]

Writes ``<date>-<device>-attention.{json,md,png}`` into ``--out-dir``.
"""

import argparse
import datetime
import functools
import json
import os
import platform
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402


def causal_flops(lengths: List[int], num_heads: int, dim: int) -> float:
    return 4.0 * num_heads * dim * sum(n * (n + 1) / 2 for n in lengths)


def bench(fn: Callable[[], object]) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_ms(fn: Callable[[], object], iters: int = 20) -> float:
    """Host (CPU) time per call, GPU work left queued: above the GPU time means launch-bound."""
    import time

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = (time.perf_counter() - start) / iters * 1e3
    torch.cuda.synchronize()
    return elapsed


def make_lengths(batch: int, max_len: int, jagged: bool, gen: torch.Generator) -> List[int]:
    if not jagged:
        return [max_len] * batch
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    lengths[0] = max_len  # the batch max is N
    return lengths


def run_case(
    batch: int,
    max_len: int,
    dim: int,
    num_heads: int,
    jagged: bool,
    fp8_modes: List[int],
    with_reference: bool,
    extra_masks: bool,
) -> List[Dict]:
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(1000 * max_len + dim + jagged)
    lengths = make_lengths(batch, max_len, jagged, gen)
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    total = int(offsets[-1])
    alpha = 1.0 / dim**0.5
    flops = causal_flops(lengths, num_heads, dim)

    def rand(*shape):
        return torch.empty(*shape, device=device, dtype=torch.bfloat16).uniform_(-1, 1)

    q, k, v, dout = (rand(total, num_heads, dim) for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    rows: List[Dict] = []
    shape = dict(B=batch, N=max_len, D=dim, H=num_heads, lengths="jagged" if jagged else "full",
                 tokens=total)

    def record(impl: str, direction: str, ms: float, mult: float = 1.0, **extra) -> None:
        tflops = flops * mult / (ms * 1e-3) / 1e12
        rows.append(dict(shape, impl=impl, direction=direction, ms=ms, tflops=tflops, **extra))
        note = f" (host {extra['host_ms']:.3f} ms/call)" if "host_ms" in extra else ""
        print(f"  {impl:>26s} {direction:>7s} {ms:9.3f} ms {tflops:7.1f} TFLOP/s{note}", flush=True)

    def ours(options: AttentionOptions, targets=None):
        # The kernels' entry points directly: the dispatcher's input checks read lengths on the
        # host (a sync per call), which a training step would pay once per batch, not per layer.
        if options.use_fp8:
            from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention as entry
        else:
            from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention as entry
        fwd = lambda: entry(q, k, v, offsets, max_len, alpha, options, targets)
        def fwd_bwd():
            out = entry(*leaves, offsets, max_len, alpha, options, targets)
            torch.autograd.grad(out, leaves, dout)
        return fwd, fwd_bwd

    print(f"B={batch} N={max_len} D={dim} H={num_heads} {'jagged' if jagged else 'full'} "
          f"tokens={total}", flush=True)
    fwd, fwd_bwd = ours(AttentionOptions())
    fwd(); fwd_bwd()  # compile + autotune outside the timing
    record("triton_bf16", "fwd", bench(fwd), host_ms=host_ms(fwd))
    record("triton_bf16", "fwd_bwd", bench(fwd_bwd), 3.5, host_ms=host_ms(fwd_bwd))

    # What a user calls: hstu_mha. Its value check reads a batch's lengths once: a repeated call
    # with the same unchanged tensors (GR's per-layer calls) skips it; "new batch" rows pass a
    # fresh offsets tensor every call and so pay the read (and a small copy kernel) each time.
    from torchrec_hstu.ops.hstu_attention import hstu_mha

    public = lambda: hstu_mha(max_len, alpha, q, k, v, offsets, kernel="TRITON", training=False)
    def public_fwd_bwd():
        out = hstu_mha(max_len, alpha, *leaves, offsets, kernel="TRITON")
        torch.autograd.grad(out, leaves, dout)
    public(); public_fwd_bwd()
    record("public_hstu_mha_bf16", "fwd", bench(public), host_ms=host_ms(public))
    record("public_hstu_mha_bf16", "fwd_bwd", bench(public_fwd_bwd), 3.5, host_ms=host_ms(public_fwd_bwd))
    public_new_batch = lambda: hstu_mha(max_len, alpha, q, k, v, offsets.clone(), kernel="TRITON", training=False)
    record("public_hstu_mha_new_batch_bf16", "fwd", bench(public_new_batch), host_ms=host_ms(public_new_batch))

    if cutlass_wheel_imports():
        from torchrec_hstu.ops.cutlass import cutlass_hstu_attention

        cut = lambda opts=AttentionOptions(): cutlass_hstu_attention(q, k, v, offsets, max_len, alpha, opts)
        def cut_fwd_bwd():
            out = cutlass_hstu_attention(*leaves, offsets, max_len, alpha, AttentionOptions())
            torch.autograd.grad(out, leaves, dout)
        cut(); cut_fwd_bwd()
        record("cutlass_bf16", "fwd", bench(cut), host_ms=host_ms(cut))
        record("cutlass_bf16", "fwd_bwd", bench(cut_fwd_bwd), 3.5)
        if dim in (64, 128, 256):
            fp8 = lambda: cut(AttentionOptions(fp8_quant_mode=5))
            with torch.no_grad():
                fp8()
                record("cutlass_fp8_mode5", "fwd", bench(fp8))

    for mode in fp8_modes:
        f8, f8b = ours(AttentionOptions(fp8_quant_mode=mode))
        f8(); f8b()
        record(f"triton_fp8_mode{mode}", "fwd", bench(f8), host_ms=host_ms(f8))
        record(f"triton_fp8_mode{mode}", "fwd_bwd", bench(f8b), 3.5)
        # The forward's quantization of q, k, v and the v transposition alone (the fused Triton
        # quantizers under the default "fast" accumulation: part of the fwd time above), and the
        # PyTorch quantizers of the emulation beside it (what a Python-side quantizer costs).
        from torchrec_hstu.ops.fp8.quantize import FP8TileSizes, quantize_for_mode
        from torchrec_hstu.ops.triton.fp8_attention import fp8_fwd_quantize

        quant = functools.partial(fp8_fwd_quantize, q, k, v, offsets, max_len, mode)
        record(f"fp8_mode{mode}_quantize_qkv", "fwd", bench(quant), 0.0, host_ms=host_ms(quant))
        tiles = FP8TileSizes.for_head_dim(dim)
        torch_quant = lambda: (quantize_for_mode(q, offsets, mode, tiles.fwd_block_m),
                               quantize_for_mode(k, offsets, mode, tiles.fwd_block_n),
                               quantize_for_mode(v, offsets, mode, tiles.fwd_block_n, colwise=True))
        record(f"fp8_mode{mode}_pytorch_quantize_qkv", "fwd", bench(torch_quant), 0.0)

    # SDPA flash on padded dense tensors.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from torchrec_hstu.ops.jagged import jagged_to_padded_dense

    def dense(x):
        return jagged_to_padded_dense(x, offsets, max_len).transpose(1, 2).contiguous()

    qd, kd, vd, dod = dense(q), dense(k), dense(v), dense(dout)
    dleaves = [x.clone().requires_grad_() for x in (qd, kd, vd)]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        sdpa_fwd = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
        def sdpa_fwd_bwd():
            out = torch.nn.functional.scaled_dot_product_attention(*dleaves, is_causal=True)
            torch.autograd.grad(out, dleaves, dod)
        sdpa_fwd(); sdpa_fwd_bwd()
        record("sdpa_flash_bf16", "fwd", bench(sdpa_fwd))
        record("sdpa_flash_bf16", "fwd_bwd", bench(sdpa_fwd_bwd), 3.5)

    if with_reference:
        from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention

        ref = lambda: pytorch_hstu_attention(q, k, v, offsets, max_len, alpha, AttentionOptions())
        ref()
        record("pytorch_reference", "fwd", bench(ref))

    if extra_masks:
        # The plain-causal winners serve these mask modes too (no extra autotuning here).
        os.environ["TORCHREC_HSTU_TRITON_AUTOTUNE"] = "0"
        # Work skipping: no mask (2x the causal work), and windows (work ~ window).
        full_fwd, _ = ours(AttentionOptions(causal=False))
        full_fwd()
        ms = bench(full_fwd)
        record("triton_bf16_noncausal", "fwd", ms, 2.0)
        for window in (max_len // 8, max_len // 4):
            wf, _ = ours(AttentionOptions(max_attn_len=window))
            wf()
            # Useful work of a window: row i sees min(i, W) + 1 keys.
            pairs = sum(sum(min(i, window) + 1 for i in range(n)) for n in lengths)
            record(f"triton_bf16_window{window}", "fwd", bench(wf),
                   pairs / sum(n * (n + 1) / 2 for n in lengths))
        targets = torch.full((batch,), 16, device=device)
        tf, tfb = ours(AttentionOptions(contextual_seq_len=8), targets)
        tf(); tfb()
        record("triton_bf16_ctx8_targets16", "fwd", bench(tf))
        record("triton_bf16_ctx8_targets16", "fwd_bwd", bench(tfb), 3.5)
        os.environ.pop("TORCHREC_HSTU_TRITON_AUTOTUNE")
    return rows


def cutlass_wheel_imports() -> bool:
    from torchrec_hstu.ops.cutlass import find_cutlass_wheel

    wheel = find_cutlass_wheel()
    return wheel is not None and wheel.flavor == "fbgemm"


def accumulation_probe(batch: int = 16, max_len: int = 4096, dim: int = 128, num_heads: int = 4,
                       modes=(2, 5)) -> List[Dict]:
    """FP8 fwd / fwd+bwd under each ``fp8_accumulation`` choice, next to bf16, one shape."""
    from torchrec_hstu.ops.triton import fp8_attention
    from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

    device = torch.device("cuda")
    offsets = torch.arange(batch + 1, device=device) * max_len
    total = batch * max_len
    q, k, v, dout = (torch.empty(total, num_heads, dim, device=device, dtype=torch.bfloat16).uniform_(-1, 1)
                     for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    flops = causal_flops([max_len] * batch, num_heads, dim)
    rows = []

    def timed(name, entry, options):
        fwd = lambda: entry(q, k, v, offsets, max_len, 1 / dim**0.5, options)
        def fwd_bwd():
            torch.autograd.grad(entry(*leaves, offsets, max_len, 1 / dim**0.5, options), leaves, dout)
        fwd(); fwd_bwd()
        for direction, fn, mult in (("fwd", fwd, 1.0), ("fwd_bwd", fwd_bwd, 3.5)):
            ms = bench(fn)
            rows.append(dict(B=batch, N=max_len, D=dim, H=num_heads, lengths="full", impl=name,
                             direction=direction, ms=ms, tflops=flops * mult / ms / 1e9))
            print(f"  {name:>32s} {direction:>7s} {ms:9.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)

    timed("triton_bf16", triton_hstu_attention, AttentionOptions())
    for policy in fp8_attention.FP8_ACCUMULATIONS:
        entry = functools.partial(fp8_attention.triton_fp8_hstu_attention, fp8_accumulation=policy)
        for mode in modes:
            timed(f"triton_fp8_mode{mode}_{policy}", entry, AttentionOptions(fp8_quant_mode=mode))
    return rows


def ratio_table(rows: List[Dict]) -> List[Dict]:
    """Per shape: ours / SDPA speed ratios (time of SDPA / time of ours)."""
    out = []
    keyf = lambda r: (r["N"], r["D"], r["lengths"], r["B"])
    shapes = sorted({keyf(r) for r in rows})
    for key in shapes:
        sub = {(r["impl"], r["direction"]): r for r in rows if keyf(r) == key}
        entry = dict(N=key[0], D=key[1], lengths=key[2], B=key[3])
        for direction in ("fwd", "fwd_bwd"):
            base = sub.get(("sdpa_flash_bf16", direction))
            ours = sub.get(("triton_bf16", direction))
            if base and ours:
                entry[f"bf16_{direction}_vs_sdpa"] = base["ms"] / ours["ms"]
            for impl, d in sub:
                if impl.startswith("triton_fp8") and d == direction and ours:
                    entry[f"{impl}_{direction}_vs_bf16"] = ours["ms"] / sub[(impl, d)]["ms"]
            cutlass = sub.get(("cutlass_bf16", direction))
            if cutlass and ours:
                entry[f"bf16_{direction}_vs_cutlass"] = cutlass["ms"] / ours["ms"]
            public = sub.get(("public_hstu_mha_bf16", direction))
            if public and ours:
                entry[f"public_{direction}_over_kernel"] = public["ms"] / ours["ms"]
        cutlass_fp8 = sub.get(("cutlass_fp8_mode5", "fwd"))
        for mode in (2, 5):
            ours_fp8 = sub.get((f"triton_fp8_mode{mode}", "fwd"))
            if cutlass_fp8 and ours_fp8:
                entry[f"fp8_mode{mode}_fwd_vs_cutlass_fp8"] = cutlass_fp8["ms"] / ours_fp8["ms"]
        out.append(entry)
    return out


def write_markdown(path: str, meta: Dict, rows: List[Dict], ratios: List[Dict]) -> None:
    lines = [f"# HSTU attention benchmark ({meta['date']}, {meta['device']})", "",
             f"Command: `{meta['command']}`", "",
             f"torch {meta['torch']}, Triton {meta['triton']}, CUDA {meta['cuda']}.", "",
             "FLOPs = 4*H*D*sum(n(n+1)/2) forward, 3.5x forward+backward (useful causal work only).",
             "", "| B | N | D | lengths | impl | dir | ms | TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['N']} | {r['D']} | {r['lengths']} | {r['impl']} | "
                     f"{r['direction']} | {r['ms']:.3f} | {r['tflops']:.1f} |")
    lines += ["", "## Ratios (speed-up = other time / our time)", ""]
    keys = sorted({k for e in ratios for k in e if k not in ("N", "D", "lengths", "B")})
    lines.append("| N | D | lengths | " + " | ".join(keys) + " |")
    lines.append("|---|---|---|" + "---|" * len(keys))
    for e in ratios:
        lines.append(f"| {e['N']} | {e['D']} | {e['lengths']} | "
                     + " | ".join(f"{e[k]:.2f}" if k in e else "" for k in keys) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path: str, rows: List[Dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["D"], r["lengths"]) for r in rows})
    fig, axes = plt.subplots(2, len(combos), figsize=(4.5 * len(combos), 8), squeeze=False)
    for col, (dim, lengths) in enumerate(combos):
        for row, direction in enumerate(("fwd", "fwd_bwd")):
            ax = axes[row][col]
            sub = [r for r in rows if r["D"] == dim and r["lengths"] == lengths
                   and r["direction"] == direction]
            for impl in sorted({r["impl"] for r in sub if "quantize" not in r["impl"]}):
                pts = sorted((r["N"], r["tflops"]) for r in sub if r["impl"] == impl)
                if len(pts) < 2:
                    continue
                style = "-o" if "fp8" not in impl else "--."
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{direction}, D={dim}, {lengths} lengths")
            ax.set_xlabel("N")
            ax.set_ylabel("TFLOP/s (useful causal)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--seq-lens", default="1024,2048,4096,8192")
    parser.add_argument("--dims", default="128,256")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--fp8-modes", default="0,1,2,3,4,5",
                        help="comma-separated fp8_quant_mode values ('' for none)")
    parser.add_argument("--fp8-all-modes-at", default="",
                        help="N:D where all six FP8 modes run (e.g. 4096:128)")
    parser.add_argument("--lengths", default="full,jagged")
    parser.add_argument("--reference-max-n", type=int, default=2048)
    parser.add_argument("--tag", default="attention")
    parser.add_argument("--accumulation-probe", action="store_true",
                        help="only time FP8 modes 2, 5 under each fp8_accumulation choice (N=4096, D=128)")
    args = parser.parse_args(argv)

    import logging

    import triton

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torchrec_hstu").setLevel(logging.INFO)
    fp8_modes = [int(m) for m in args.fp8_modes.split(",") if m != ""]
    all_modes_at = tuple(int(x) for x in args.fp8_all_modes_at.split(":")) if args.fp8_all_modes_at else None
    device_name = torch.cuda.get_device_name().replace(" ", "-")
    date = datetime.date.today().isoformat()
    meta = dict(date=date, device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                command="python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])))
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{date}-{device_name}-{args.tag}")
    if args.accumulation_probe:
        rows = accumulation_probe()
        with open(stem + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        return
    rows: List[Dict] = []
    for dim in [int(d) for d in args.dims.split(",")]:
        for max_len in [int(n) for n in args.seq_lens.split(",")]:
            batch = 32 if max_len <= 2048 else 16
            modes = [0, 1, 2, 3, 4, 5] if all_modes_at == (max_len, dim) else fp8_modes
            for lengths in args.lengths.split(","):
                rows += run_case(batch, max_len, dim, args.heads, lengths == "jagged", modes,
                                 with_reference=max_len <= args.reference_max_n,
                                 extra_masks=(max_len == 4096 and dim == 128 and lengths == "full"))
                # Written after every case, so a run cut short keeps what it measured.
                ratios = ratio_table(rows)
                with open(stem + ".json", "w") as f:
                    json.dump(dict(meta=meta, rows=rows, ratios=ratios), f, indent=1)
                write_markdown(stem + ".md", meta, rows, ratios)
                plot(stem + ".png", rows)
    print("\nratios:")
    for e in ratios:
        print("  ", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in e.items()})


if __name__ == "__main__":
    main()
