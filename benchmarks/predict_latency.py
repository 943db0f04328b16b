"""Predict latency: the AOTInductor package from ``torchrec_hstu.export`` vs the eager model.

One process, one randomly initialised model built from a ``.pbtxt`` config, exported and
compiled once (default inductor settings, the production path); then for each batch size the
same request batches run through the eager ``model.eval()`` (``torch.inference_mode``) and
through the package (``torchrec_hstu.predict.Predictor``), interleaved, after ``--warmup``
runs each. Reported: p50 / p99 milliseconds per batch over ``--iters`` runs, and the largest
absolute difference between the two outputs.

Requests (ranking configs): per channel a history of ``history_len * U(0.5, 1.5)`` items
(capped at the bound), ``--candidates`` candidates each. Retrieval configs: one history per
request. Inputs are on the device before timing (the package's host-to-device copy is then a
no-op); on CUDA every run is synchronised.

On the GPU machine there are no fbgemm CUDA ops: if the eager model cannot run with its item
table on CUDA, it runs with the table on CPU (``model.place``) and the JSON says so
(``eager_placement``); the package always runs entirely on the device.

Usage::

    .venv/bin/python benchmarks/predict_latency.py                  # CPU, writes benchmarks/results/
    .venv/bin/python benchmarks/predict_latency.py --device cuda --kernel TRITON --mixed-precision bf16
    .venv/bin/python benchmarks/predict_latency.py --device cuda --kernel TRITON --mixed-precision bf16 --fp8-quant-mode 2
    .venv/bin/python benchmarks/predict_latency.py --quick          # tiny, no files
"""

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import device_description  # noqa: E402
from torchrec_hstu.config import load_config  # noqa: E402
from torchrec_hstu.export import (  # noqa: E402
    RANKING,
    autocast_context,
    build_model_from_config,
    export_model,
)
from torchrec_hstu.predict import Predictor, check_batch  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "examples", "configs", "ranking_two_channel.pbtxt")


def device_label(device: torch.device) -> str:
    """Short device name for file names: ``cpu2t`` (threads), ``h100``, ..."""
    if device.type == "cpu":
        return f"cpu{torch.get_num_threads()}t"
    name = torch.cuda.get_device_name(device).lower()
    for token in name.replace("-", " ").split():
        if any(ch.isdigit() for ch in token) and token[0].isalpha():
            return token
    return "cuda"


def make_batch(signature: Any, batch_size: int, history_len: int, candidates: int, seed: int) -> Dict[str, List[int]]:
    """A request batch for the package's signature (lists; validated by ``check_batch``)."""
    generator = torch.Generator().manual_seed(seed)
    bound = signature.max_seq_len
    if signature.model_type == RANKING:
        num_targets = [min(candidates, bound - 1)] * batch_size
        channels = len(signature.channels)
    else:
        num_targets = [0] * batch_size
        channels = 1
    lengths = []
    for _ in range(channels):
        for b in range(batch_size):
            n = int(history_len * (0.5 + torch.rand((), generator=generator).item()))
            lengths.append(max(0 if signature.model_type == RANKING else 1, min(n, bound - num_targets[b])))
    total = sum(lengths)
    stamps = [sorted(torch.randint(0, 5_000_000, (n,), generator=generator).tolist()) for n in lengths]
    flat_stamps = [t for part in stamps for t in part]
    ids = torch.randint(0, signature.num_items, (total,), generator=generator).tolist()
    if signature.model_type != RANKING:
        return {"item_ids": ids, "lengths": lengths, "timestamps": flat_stamps}
    targets = sum(num_targets)
    return {
        "history_ids": ids,
        "history_lengths": lengths,
        "history_timestamps": flat_stamps,
        "history_actions": torch.randint(0, 4, (total,), generator=generator).tolist(),
        "candidate_ids": torch.randint(0, signature.num_items, (targets,), generator=generator).tolist(),
        "num_targets": num_targets,
        "candidate_timestamps": [6_000_000] * targets,
    }


def eager_call(model: torch.nn.Module, signature: Any, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    if signature.model_type == RANKING:
        return model(*inputs)
    item_ids, lengths, timestamps = inputs
    return model(item_ids, lengths, timestamps, int(lengths.max()))


def fbgemm_has_cuda_kernels() -> bool:
    """Whether the installed fbgemm_gpu registers CUDA kernels (the CPU build does not)."""
    try:
        import fbgemm_gpu  # noqa: F401 - registers torch.ops.fbgemm
    except ImportError:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fbgemm::asynchronous_complete_cumsum", "CUDA")


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100.0 * (len(ordered) - 1)))))
    return ordered[index]


def time_interleaved(
    runs: Dict[str, Callable[[], torch.Tensor]], iters: int, warmup: int, sync: Callable[[], None]
) -> Dict[str, List[float]]:
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--kernel", default=None, help="override the config kernel (PYTORCH, TRITON, AUTO)")
    parser.add_argument("--mixed-precision", choices=("bf16", "fp16"), default=None)
    parser.add_argument("--fp8-quant-mode", type=int, default=None)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--history-len", type=int, default=64, help="mean history length per channel")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per request (ranking)")
    parser.add_argument("--num-items", type=int, default=10_000)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny run, no files written")
    parser.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.history_len, args.iters, args.warmup = "1,4", 16, 5, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    autocast_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + list(sys.argv[1:] if argv is None else argv))

    torch.manual_seed(0)
    config = load_config(args.config)
    model = build_model_from_config(
        config, num_items=args.num_items, kernel=args.kernel, fp8_quant_mode=args.fp8_quant_mode
    ).eval()
    on_device = copy.deepcopy(model).to(device).eval()
    workdir = tempfile.mkdtemp(prefix="predict_latency_")
    package = os.path.join(workdir, "model.pt2")
    max_seq_len = int(config.max_seq_len)
    print(f"exporting {os.path.relpath(args.config, REPO)} to {package} ...", flush=True)
    result = export_model(on_device, package, max(batch_sizes + [2]), max_seq_len, autocast_dtype=autocast_dtype)
    signature = result.signature
    print(f"export {signature.export_seconds:.1f} s, AOTInductor compile {signature.compile_seconds:.1f} s", flush=True)
    predictor = Predictor(package)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    eager_model, placement = on_device, "all on device"
    if device.type == "cuda" and not fbgemm_has_cuda_kernels():
        # Calling a CPU-only fbgemm build's ops on CUDA tensors can crash the process (not
        # raise), so the table placement is decided up front.
        print("fbgemm has no CUDA kernels here: eager runs with the item table on CPU", flush=True)
        eager_model, placement = copy.deepcopy(model).place(device).eval(), "item table on CPU"

    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    rows = []
    for batch_size in batch_sizes:
        inputs = [x.to(device) for x in check_batch(signature, make_batch(
            signature, batch_size, args.history_len, args.candidates, seed=batch_size))]

        def run_eager() -> torch.Tensor:
            with torch.inference_mode(), autocast_context(device.type, autocast_dtype):
                return eager_call(eager_model, signature, inputs)

        def run_package() -> torch.Tensor:
            return predictor.run(inputs)

        diff = (run_package().float().cpu() - run_eager().float().cpu()).abs().max().item()
        times = time_interleaved({"eager": run_eager, "aoti": run_package}, args.iters, args.warmup, sync)
        row = {
            "batch_size": batch_size,
            "tokens": int(sum(x.numel() for x in inputs[:1])) + (int(inputs[4].numel()) if len(inputs) > 4 else 0),
            "eager_p50_ms": percentile(times["eager"], 50),
            "eager_p99_ms": percentile(times["eager"], 99),
            "aoti_p50_ms": percentile(times["aoti"], 50),
            "aoti_p99_ms": percentile(times["aoti"], 99),
            "max_abs_diff": diff,
        }
        row["speedup_p50"] = row["eager_p50_ms"] / row["aoti_p50_ms"]
        rows.append(row)
        print(
            f"B={batch_size:4d} tokens={row['tokens']:6d}  eager p50 {row['eager_p50_ms']:8.2f} ms p99 "
            f"{row['eager_p99_ms']:8.2f} ms | package p50 {row['aoti_p50_ms']:8.2f} ms p99 "
            f"{row['aoti_p99_ms']:8.2f} ms | x{row['speedup_p50']:.2f} | max|diff| {diff:.2e}",
            flush=True,
        )

    if args.quick:
        return 0
    date = datetime.date.today().isoformat()
    label = device_label(device)
    load_after = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    payload = {
        "date": date,
        "device": device_description(device),
        "command": command,
        "torch": torch.__version__,
        "config": os.path.relpath(args.config, REPO),
        "model_type": signature.model_type,
        "kernels": signature.kernels,
        "fp8_quant_modes": signature.fp8_quant_modes,
        "mixed_precision": args.mixed_precision,
        "num_items": args.num_items,
        "history_len_mean": args.history_len,
        "candidates": args.candidates if signature.model_type == RANKING else None,
        "iters": args.iters,
        "warmup": args.warmup,
        "export_seconds": signature.export_seconds,
        "compile_seconds": signature.compile_seconds,
        "eager_placement": placement,
        "load_average_1min": [load_before, load_after],
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{date}-{label}-predict-latency")
    if args.fp8_quant_mode is not None and args.fp8_quant_mode >= 0:
        stem += f"-fp8m{args.fp8_quant_mode}"
    with open(stem + ".json", "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    lines = [
        f"# Predict latency: AOTInductor package vs eager ({date}, {payload['device']})",
        "",
        f"Command: `{command}`",
        "",
        f"Model: `{payload['config']}` ({signature.model_type}, random weights, {args.num_items} items), "
        f"kernels {signature.kernels}, FP8 modes {signature.fp8_quant_modes}, mixed precision "
        f"{args.mixed_precision or 'off (float32)'}; torch {torch.__version__}. Requests: history "
        f"~{args.history_len} items per channel (x U(0.5, 1.5))"
        + (f", {args.candidates} candidates each" if signature.model_type == RANKING else "")
        + f". {args.iters} timed runs per side after {args.warmup} warm-up runs, interleaved. "
        f"Export {signature.export_seconds:.1f} s, AOTInductor compile {signature.compile_seconds:.1f} s. "
        f"Eager placement: {placement}. 1-minute load average before / after: {load_before} / "
        f"{load_after} on {os.cpu_count()} CPUs (other processes share the machine: p99 mostly "
        "measures them).",
        "",
        "| batch | tokens | eager p50 ms | eager p99 ms | package p50 ms | package p99 ms | p50 speed-up | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['batch_size']} | {row['tokens']} | {row['eager_p50_ms']:.2f} | {row['eager_p99_ms']:.2f} | "
            f"{row['aoti_p50_ms']:.2f} | {row['aoti_p99_ms']:.2f} | {row['speedup_p50']:.2f}x | {row['max_abs_diff']:.1e} |"
        )
    with open(stem + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
