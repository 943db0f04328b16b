"""Accuracy of FP8 HSTU attention (the exact CPU emulation of the CUTLASS kernel) per fp8_quant_mode.

For every case of a grid (head dim ``D`` in {64, 128}; one jagged batch with lengths
``0, 1, 37, 128, 200, 333, 512`` tokens, i.e. empty, single-token and several 64/128-token
blocks; masks: causal, causal + targets, causal + contextual prefix + targets, SLA + targets),
q, k, v and dO are drawn ``N(0, 1)`` in bfloat16 times an input scale: ``1``; ``0.05`` (small
magnitudes: what they do to mode 0, which has no scales); ``token`` (each token and head
multiplied by ``2^u``, ``u ~ U(-5, 3)``: magnitudes that vary inside a block, a sample and the
tensor, which separates the scale granularities). ``alpha = 1 / sqrt(D)`` (STULayer's default). The gold reference is the PyTorch HSTU attention in float64 on those same bfloat16
values; the rows are

* ``bf16``: the plain bf16 path (``fp8_quant_mode=-1``: fp32 compute, bf16 output/grads),
* ``mode 0..5``: the FP8 emulation with bf16 inputs (bf16 output/grads).

Per tensor (O, dQ, dK, dV) and row we report, worst case over the grid and 3 seeds: ``max_abs`` =
``max |x - ref|``, ``max_rel`` = ``max |x - ref| / max |ref|`` and ``rel_rms`` =
``||x - ref||_2 / ||ref||_2``.

Usage::

    .venv/bin/python benchmarks/fp8_accuracy.py           # prints, writes benchmarks/results/
    .venv/bin/python benchmarks/fp8_accuracy.py --quick   # D=64, shorter batch, no files
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402
from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated  # noqa: E402
from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention  # noqa: E402

LENGTHS = [0, 1, 37, 128, 200, 333, 512]
QUICK_LENGTHS = [0, 1, 37, 150]
MASKS: Dict[str, Dict] = {
    "causal": dict(options=dict(), targets=False),
    "targets": dict(options=dict(), targets=True),
    "contextual+targets": dict(options=dict(contextual_seq_len=3), targets=True),
    "sla+targets": dict(options=dict(sla_k1=64, sla_k2=16), targets=True),
}
SCALES = ["1", "0.05", "token"]
SEEDS = [0, 1, 2]
ROWS = ["bf16"] + [f"mode {m}" for m in range(6)]
TENSORS = ["O", "dQ", "dK", "dV"]


def draw_input(total: int, heads: int, dim: int, scale: str, gen: torch.Generator) -> torch.Tensor:
    """bf16 ``[total, heads, dim]`` drawn ``N(0, 1)`` times ``scale`` (a number), or times a
    per-token power of two in ``[2^-5, 2^3)`` for ``scale == "token"``."""
    x = torch.randn(total, heads, dim, generator=gen)
    if scale == "token":
        x = x * torch.exp2(torch.rand(total, heads, 1, generator=gen) * 8 - 5)
    else:
        x = x * float(scale)
    return x.to(torch.bfloat16)


def make_case(lengths: List[int], heads: int, dim: int, targets: bool, scale: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    total = int(offsets[-1])
    q, k, v, grad = (draw_input(total, heads, dim, scale, gen) for _ in range(4))
    num_targets = None
    if targets:
        num_targets = torch.tensor([min(n, int(t)) for n, t in zip(lengths, torch.randint(1, 9, (len(lengths),), generator=gen))])
    return q, k, v, grad, offsets, num_targets


def run(fn, q, k, v, grad) -> List[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return [out.detach()] + [g.detach() for g in grads]


def errors(x: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    err = x.double() - ref
    ref_max = float(ref.abs().max()) if ref.numel() else 0.0
    ref_rms = float(ref.norm()) if ref.numel() else 0.0
    max_abs = float(err.abs().max()) if err.numel() else 0.0
    return dict(
        max_abs=max_abs,
        max_rel=max_abs / ref_max if ref_max > 0 else 0.0,
        rel_rms=float(err.norm()) / ref_rms if ref_rms > 0 else 0.0,
    )


def measure(
    lengths: List[int], dims: List[int], scale: str, heads: int = 2, seed: int = 0
) -> Tuple[Dict, List[Dict]]:
    worst: Dict = {row: {t: dict(max_abs=0.0, max_rel=0.0, rel_rms=0.0) for t in TENSORS} for row in ROWS}
    cases: List[Dict] = []
    max_len = max(lengths)
    for dim in dims:
        alpha = 1.0 / dim ** 0.5
        for mask_name, mask in MASKS.items():
            q, k, v, grad, offsets, num_targets = make_case(lengths, heads, dim, mask["targets"], scale, seed)
            base = AttentionOptions(**mask["options"])
            gold = run(
                lambda q_, k_, v_: pytorch_hstu_attention(q_, k_, v_, offsets, max_len, alpha, base, num_targets),
                q.double(), k.double(), v.double(), grad.double(),
            )
            for row in ROWS:
                start = time.perf_counter()
                if row == "bf16":
                    fn = lambda q_, k_, v_: pytorch_hstu_attention(  # noqa: E731
                        q_, k_, v_, offsets, max_len, alpha, base, num_targets
                    )
                else:
                    opts = AttentionOptions(**mask["options"], fp8_quant_mode=int(row.split()[1]))
                    fn = lambda q_, k_, v_, o=opts: fp8_hstu_attention_emulated(  # noqa: E731
                        q_, k_, v_, offsets, max_len, alpha, o, num_targets
                    )
                results = run(fn, q, k, v, grad)
                seconds = time.perf_counter() - start
                for name, x, ref in zip(TENSORS, results, gold):
                    e = errors(x, ref)
                    cases.append(dict(scale=scale, dim=dim, mask=mask_name, row=row, tensor=name, seconds=seconds, **e))
                    for key, value in e.items():
                        worst[row][name][key] = max(worst[row][name][key], value)
    return worst, cases


def to_markdown(worst: Dict) -> str:
    header = "| | " + " | ".join(f"{t} max_abs | {t} max_rel | {t} rel_rms" for t in TENSORS) + " |"
    sep = "|---" * (1 + 3 * len(TENSORS)) + "|"
    lines = [header, sep]
    for row in ROWS:
        cells = []
        for t in TENSORS:
            w = worst[row][t]
            cells += [f"{w['max_abs']:.2e}", f"{w['max_rel']:.4f}", f"{w['rel_rms']:.4f}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="D=64 and a shorter batch; writes no files")
    parser.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    args = parser.parse_args(argv)
    # One thread: small per-group tensors gain nothing from intra-op threads (and lose a lot to
    # barrier waits on a shared CPU); results do not depend on it.
    torch.set_num_threads(1)
    lengths, dims = (QUICK_LENGTHS, [64]) if args.quick else (LENGTHS, [64, 128])
    start = time.perf_counter()
    worst, cases, tables = {}, [], []
    for scale in SCALES:
        worst[scale] = None
        for seed in SEEDS:
            seed_worst, seed_cases = measure(lengths, dims, scale, seed=seed)
            cases += [dict(seed=seed, **c) for c in seed_cases]
            worst[scale] = seed_worst if worst[scale] is None else {
                row: {t: {key: max(value, worst[scale][row][t][key]) for key, value in seed_worst[row][t].items()}
                      for t in TENSORS}
                for row in ROWS
            }
        tables.append(f"input scale {scale}:\n\n" + to_markdown(worst[scale]))
    elapsed = time.perf_counter() - start
    table = "\n\n".join(tables)
    date = datetime.date.today().isoformat()
    command = "python benchmarks/fp8_accuracy.py" + (" --quick" if args.quick else "")
    device = f"cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    print(f"FP8 emulation accuracy vs float64 reference ({date}, {device}, {elapsed:.0f} s)")
    print(f"grid: D={dims}, lengths={lengths}, H=2, masks={list(MASKS)}, seeds={SEEDS}; worst case\n")
    print(table)
    if args.quick:
        return
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{date}-cpu-fp8-accuracy")
    meta = dict(date=date, device=device, command=command, dims=dims, lengths=lengths, heads=2,
                masks=list(MASKS), scales=SCALES, seeds=SEEDS, seconds=elapsed)
    with open(stem + ".json", "w") as f:  # one case per line
        f.write('{"meta": ' + json.dumps(meta) + ',\n"worst": ' + json.dumps(worst) + ',\n"cases": [\n')
        f.write(",\n".join(json.dumps(case) for case in cases) + "\n]}\n")
    with open(stem + ".md", "w") as f:
        f.write(f"# FP8 emulation accuracy vs float64 reference\n\n- date: {date}\n- device: {device}\n"
                f"- command: `{command}`\n- grid: D={dims}, lengths={lengths}, H=2, masks={list(MASKS)}, "
                f"seeds={SEEDS}; "
                f"inputs N(0,1) x input scale in bf16, alpha=1/sqrt(D); worst case over the grid\n\n{table}\n")
    print(f"\nwrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
