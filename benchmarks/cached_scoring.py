"""Cached delta scoring vs full recompute: scoring candidates against a KV cache of user histories.

For each history length ``N`` and candidate count ``T`` (per user, ``B`` users) the same
``STUStack`` (eval mode) produces the candidates' outputs two ways, side by side in one process:

* ``full``: ``stack(x[history | candidates], num_targets=T)``: the whole sequence, every time.
* ``cached``: ``stack.cached_forward(x[candidates], cache, num_targets=T)`` against a cache from
  one ``stack.prefill(x[history])`` (prefill timed separately: it is paid once per user request
  and amortized over every candidate set scored against it).

Reported: median time of each (after warmup, interleaved), ``ratio = full / cached``, prefill
time, the break-even number of candidate sets (``prefill / (full - cached)``), and the max
abs difference between the two outputs (they compute the same thing). Times are wall-clock
medians; on CUDA each call is synchronized.

Usage::

    .venv/bin/python benchmarks/cached_scoring.py                    # CPU grid, writes results
    .venv/bin/python benchmarks/cached_scoring.py --quick            # tiny, no files
    python benchmarks/cached_scoring.py --device cuda --kernel TRITON --dtype bfloat16 \\
        --histories 1024 2048 4096 8192 --candidates 16 64 256 --batch 16   # the H100 grid
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import device_description  # noqa: E402
from torchrec_hstu.modules import STULayer, STUStack  # noqa: E402
from torchrec_hstu.ops.jagged import concat_2D_jagged, lengths_to_offsets  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_stack(args: argparse.Namespace, device: torch.device) -> STUStack:
    torch.manual_seed(0)
    layers = [
        STULayer(
            embedding_dim=args.embedding_dim,
            num_heads=args.heads,
            hidden_dim=args.head_dim,
            attention_dim=args.head_dim,
            output_dropout_ratio=0.0,
            kernel=args.kernel,
            fp8_quant_mode=args.fp8_quant_mode,
            contextual_seq_len=args.contextual_seq_len,
        )
        for _ in range(args.layers)
    ]
    return STUStack(layers).to(device=device, dtype=DTYPES[args.dtype]).eval()


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    return run


def measure(stack: STUStack, history: int, candidates: int, args: argparse.Namespace, device: torch.device) -> Dict:
    dtype = DTYPES[args.dtype]
    batch = args.batch
    gen = torch.Generator().manual_seed(history + candidates)
    # Histories of N tokens (the contextual prefix included), T candidates each.
    hist_len = torch.full((batch,), history, dtype=torch.int64)
    cand_len = torch.full((batch,), candidates, dtype=torch.int64)
    x_hist = torch.randn(batch * history, args.embedding_dim, generator=gen).to(device, dtype)
    x_cand = torch.randn(batch * candidates, args.embedding_dim, generator=gen).to(device, dtype)
    ho, co = lengths_to_offsets(hist_len).to(device), lengths_to_offsets(cand_len).to(device)
    x_full = concat_2D_jagged(x_hist, x_cand, ho, co)
    fo = ho + co
    targets = cand_len.to(device)
    max_len = history + candidates
    rows = torch.cat([torch.arange(int(e) - candidates, int(e)) for e in fo[1:].tolist()]).to(device)
    clock = timer(device)

    with torch.inference_mode():
        def full():
            return stack(x_full, fo, max_len, targets).x[rows]

        def prefill():
            return stack.prefill(x_hist, ho, max_len)[1]

        cache = prefill()

        def cached():
            return stack.cached_forward(x_cand, cache, prefix_offsets=ho, delta_offsets=co, num_targets=targets)[0]

        diff = float((full().float() - cached().float()).abs().max())
        scale = float(full().float().abs().max())
        for _ in range(args.warmup):
            full(), cached(), prefill()
        times: Dict[str, List[float]] = {"full": [], "cached": [], "prefill": []}
        for _ in range(args.repeats):
            for name, fn in (("full", full), ("cached", cached), ("prefill", prefill)):
                times[name].append(clock(fn))
    med = {name: statistics.median(values) for name, values in times.items()}
    saved = med["full"] - med["cached"]
    return {
        "full_min_ms": min(times["full"]),
        "cached_min_ms": min(times["cached"]),
        "load_avg_1min": os.getloadavg()[0],
        "history": history,
        "candidates": candidates,
        "batch": batch,
        "full_ms": med["full"],
        "cached_ms": med["cached"],
        "prefill_ms": med["prefill"],
        "ratio": med["full"] / med["cached"],
        "break_even_sets": (med["prefill"] / saved) if saved > 0 else None,
        "max_abs_diff": diff,
        "max_abs_output": scale,
        "times_ms": times,
    }


def write_results(results: List[Dict], args: argparse.Namespace, device: torch.device, command: str) -> None:
    date = datetime.date.today().isoformat()
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-")
    stem = os.path.join(REPO, "benchmarks", "results", f"{date}-{tag}-cached-scoring")
    meta = {
        "date": date,
        "device": device_description(device),
        "torch": torch.__version__,
        "command": command,
        "config": {k: v for k, v in vars(args).items() if k not in ("quick", "no_write")},
    }
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = [
        "# Cached delta scoring vs full recompute (STUStack, eval)",
        "",
        f"- date: {date}; device: {meta['device']}; torch {torch.__version__}",
        f"- command: `{command}`",
        f"- model: {args.layers} STU layers, d={args.embedding_dim}, H={args.heads}, head dim {args.head_dim}, "
        f"dtype {args.dtype}, kernel {args.kernel}, fp8_quant_mode {args.fp8_quant_mode}, "
        f"contextual_seq_len {args.contextual_seq_len}",
        f"- time: median of {args.repeats} runs after {args.warmup} warmups, full / cached / prefill interleaved",
        "",
        "| history N | candidates T | B | full ms (min) | cached ms (min) | ratio full/cached | prefill ms | "
        "break-even sets | max abs diff (max abs out) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        be = "-" if r["break_even_sets"] is None else f"{r['break_even_sets']:.2f}"
        lines.append(
            f"| {r['history']} | {r['candidates']} | {r['batch']} | {r['full_ms']:.2f} ({r['full_min_ms']:.2f}) | "
            f"{r['cached_ms']:.2f} ({r['cached_min_ms']:.2f}) | {r['ratio']:.1f}x | {r['prefill_ms']:.2f} | {be} | "
            f"{r['max_abs_diff']:.1e} ({r['max_abs_output']:.1f}) | {r['load_avg_1min']:.1f} |"
        )
    lines += [
        "",
        "full: `stack(history ++ candidates, num_targets=T)` per candidate set; cached: "
        "`stack.cached_forward(candidates, cache)` against one `stack.prefill(history)`; "
        "break-even sets: candidate sets per prefill after which prefill + cached beats full "
        "(`prefill / (full - cached)`). load avg: the machine's 1-minute load average after the cell "
        "(CPU runs share the cores with other jobs).",
    ]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", default=None, help="PYTORCH (default on CPU) or TRITON (default on CUDA)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--histories", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--candidates", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--contextual-seq-len", type=int, default=0)
    parser.add_argument("--fp8-quant-mode", type=int, default=-1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared 2-core machine a second thread stalls on barriers)")
    parser.add_argument("--quick", action="store_true", help="tiny grid, no files")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    args.kernel = args.kernel or ("TRITON" if device.type == "cuda" else "PYTORCH")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.quick:
        args.histories, args.candidates, args.repeats, args.warmup = [256], [16, 64], 3, 1
        args.embedding_dim, args.head_dim = 32, 16
    command = "python benchmarks/cached_scoring.py " + " ".join(sys.argv[1:])
    stack = build_stack(args, device)
    results = []
    for history in args.histories:
        for candidates in args.candidates:
            r = measure(stack, history, candidates, args, device)
            results.append(r)
            print(
                f"N={history:5d} T={candidates:4d} B={args.batch}: full {r['full_ms']:9.2f} ms  cached "
                f"{r['cached_ms']:8.2f} ms  ratio {r['ratio']:6.1f}x  prefill {r['prefill_ms']:9.2f} ms  "
                f"diff {r['max_abs_diff']:.1e}",
                flush=True,
            )
    if not (args.quick or args.no_write):
        write_results(results, args, device, command)


if __name__ == "__main__":
    main()
