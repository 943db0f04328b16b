"""Host time vs GPU time of one training step of a 4-layer ``STUStack`` (issue 17, part 1).

A step is: the batch's edge check (:func:`~torchrec_hstu.ops.common.check_jagged_batch_sync`,
the one host read per batch), then forward under bf16 autocast, loss, backward and an optimizer
step with the facts passed down (no host read). Per shape it reports, medians over ``--steps``:

* ``host ms``: wall time of issuing the step's Python (forward + backward + optimizer, after
  the edge check), with nothing synchronizing it;
* ``GPU ms``: GPU execution time of that step, from CUDA events around it with the stream held
  by a sleep kernel until the whole step is queued (so GPU idle gaps while the host issues
  work are not counted);
* ``edge ms``: the edge check (one host read: it waits for the GPU work queued before it);
* ``wall ms``: time per step of a loop of ``edge + step`` with no other synchronization;
* ``syncs``: host syncs of one step counted by ``torch.cuda.set_sync_debug_mode("warn")``
  (the edge check's included: 1 is the target).

The step is GPU-bound when ``host ms`` is at most half ``GPU ms`` (the issue's target for
B=32 N=1024 and B=16 N=4096). ``--profile`` prints the host's top operators of one step.

Usage::

    python benchmarks/host_vs_gpu_step.py --out benchmarks/results/2026-12-02-h200-host-vs-gpu-step.json
    .venv/bin/python benchmarks/host_vs_gpu_step.py --device cpu --kernel PYTORCH --shapes 2x32x32 --steps 2 \\
        --out /tmp/host_vs_gpu.json      # tiny CPU run: proves the script executes

Shapes are ``BxNxd`` (batch, max length, model dim); lengths are drawn uniformly from
``[N/4, N]`` (seeded), ``--heads`` heads of ``d / heads`` (u, v, q, k).
"""

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import device_description  # noqa: E402
from torchrec_hstu.modules import STUStack  # noqa: E402
from torchrec_hstu.ops.common import check_jagged_batch_sync  # noqa: E402
from torchrec_hstu.ops.jagged import lengths_to_offsets  # noqa: E402

DEFAULT_SHAPES = ("32x256x256", "32x1024x256", "16x4096x512")


def parse_shape(text: str) -> Tuple[int, int, int]:
    batch, max_len, dim = (int(part) for part in text.lower().split("x"))
    return batch, max_len, dim


def build_step(args: argparse.Namespace, shape: Tuple[int, int, int], device: torch.device, recompute: bool = True,
               compile_mode: str = "none"):
    """``(edge, step, tokens)``: the edge check and the step after it, for one shape.

    ``compile_mode`` other than ``"none"`` wraps the stack in ``torch.compile(mode=...)`` (the
    attention kernels stay opaque custom ops; the dense parts around them are fused).
    """
    batch, max_len, dim = shape
    torch.manual_seed(0)
    head_dim = dim // args.heads
    stu = dict(
        embedding_dim=dim, num_heads=args.heads, hidden_dim=head_dim, attention_dim=head_dim,
        output_dropout_ratio=0.0,
    )
    if not recompute:  # activation recompute (the anchors' default) replays ops in backward
        stu.update(recompute_normed_x=False, recompute_uvqk=False, recompute_y=False)
    stack = STUStack.uniform(stu, args.layers, kernel=args.kernel).to(device)
    optimizer = torch.optim.Adam(stack.parameters(), lr=1e-4)
    model = stack if compile_mode == "none" else torch.compile(stack, mode=None if compile_mode == "default" else compile_mode)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(max_len // 4, 1), max_len + 1, (batch,), generator=generator)
    offsets = lengths_to_offsets(lengths).to(device)
    num_targets = None
    if args.targets > 0:
        num_targets = torch.clamp(lengths, max=args.targets).to(device)
    tokens = int(lengths.sum())
    x = torch.randn(tokens, dim, device=device)

    def edge():
        return check_jagged_batch_sync(offsets, tokens, max_len, num_targets)

    def step(facts) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, offsets, max_len, num_targets, batch_facts=facts)
            loss = out.x.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return edge, step, tokens


def _sleep_ms(ms: float) -> None:
    # Hold the stream while the host queues the step (about 2 GHz: cycles per ms).
    torch.cuda._sleep(int(max(ms, 0.1) * 2_000_000))


def measure(edge: Callable[[], Any], step: Callable[[Any], None], device: torch.device,
            steps: int) -> Dict[str, Optional[float]]:
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    host, gpu, edges = [], [], []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        facts = edge()
        edges.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            _sleep_ms(2 * statistics.median(host) + 5 if host else 50)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        step(facts)
        host.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end))
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(edge())
    sync()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    return {
        "host_ms": statistics.median(host),
        "gpu_ms": statistics.median(gpu) if gpu else None,
        "edge_ms": statistics.median(edges),
        "wall_ms": wall,
    }


def count_syncs(edge: Callable[[], Any], step: Callable[[Any], None], device: torch.device) -> Optional[int]:
    """Host syncs of one ``edge + step`` by the CUDA sync debug mode (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(edge())
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_step(edge: Callable[[], Any], step: Callable[[Any], None], device: torch.device, rows: int) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step(edge())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def markdown(rows: List[Dict[str, Any]]) -> str:
    def fmt(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [
        "| B | N | d | tokens | recompute | compile | host ms | GPU ms | host / GPU | edge ms | wall ms | syncs |",
        "| ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = None if not r["gpu_ms"] else r["host_ms"] / r["gpu_ms"]
        lines.append(
            f"| {r['batch']} | {r['max_len']} | {r['dim']} | {r['tokens']} | {'on' if r['recompute'] else 'off'} | "
            f"{r.get('compile', 'none')} | "
            f"{fmt(r['host_ms'])} | "
            f"{fmt(r['gpu_ms'])} | {fmt(ratio)} | {fmt(r['edge_ms'])} | {fmt(r['wall_ms'])} | "
            f"{'n/a' if r['syncs'] is None else r['syncs']} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kernel", default="TRITON")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BxNxd, e.g. 32x1024x256")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--targets", type=int, default=0, help="num_targets per sequence (0: None)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="print the top host operators of one step")
    parser.add_argument("--recompute", choices=("on", "off", "both"), default="on",
                        help="the STU layers' activation recompute (on: the default of STULayer)")
    parser.add_argument("--compile", nargs="+", default=["none"],
                        choices=("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="torch.compile modes of the stack to measure (none: eager)")
    parser.add_argument("--out", default=None, help="JSON result path (a .md table is written beside it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs CUDA; use --device cpu --kernel PYTORCH for a dry run")
    rows = []
    variants = {"on": [True], "off": [False], "both": [True, False]}[args.recompute]
    for text in args.shapes:
        for recompute, compile_mode in itertools.product(variants, args.compile):
            shape = parse_shape(text)
            edge, step, tokens = build_step(args, shape, device, recompute, compile_mode)
            for _ in range(args.warmup):
                step(edge())
            syncs = count_syncs(edge, step, device)
            row = {"batch": shape[0], "max_len": shape[1], "dim": shape[2], "tokens": tokens, "syncs": syncs,
                   "recompute": recompute, "compile": compile_mode}
            row.update(measure(edge, step, device, args.steps))
            rows.append(row)
            print(f"B={shape[0]} N={shape[1]} d={shape[2]} recompute={recompute} compile={compile_mode}: "
                  f"host {row['host_ms']:.2f} ms, GPU "
                  f"{'n/a' if row['gpu_ms'] is None else format(row['gpu_ms'], '.2f')} ms, syncs {syncs}", flush=True)
            if args.profile:
                print(profile_step(edge, step, device, rows=30))
    table = markdown(rows)
    print(table)
    if args.out:
        result = {
            "date": datetime.date.today().isoformat(),
            "device": device_description(device),
            "torch": torch.__version__,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as handle:
            handle.write(f"# Host vs GPU time per STUStack training step\n\n{result['date']}, {result['device']}, "
                         f"torch {result['torch']}\n\n`{result['command']}`\n\n{table}\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
