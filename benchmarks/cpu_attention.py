"""CPU speed and memory of the PyTorch HSTU attention reference vs a padded-dense formulation.

Both variants compute the same thing, forward + backward, on the same jagged batch::

    O = (silu(alpha * Q K^T) / N * causal_mask) @ V        per sequence and head

* ``ours``: ``hstu_attention(kernel=PYTORCH)`` (length-grouped: each group of similar lengths
  is padded only to its own longest sequence).
* ``padded_dense``: written here, the common formulation: pad every sequence to the batch
  ``N``, ``B * N^2`` scores per head whatever the lengths, dense mask, back to jagged.

Time: median of ``--repeats`` fwd+bwd runs after ``--warmup`` runs, variants interleaved in
one process. Memory: each variant runs once in a fresh subprocess; we report the increase of
the process's peak resident set size (``VmHWM`` in ``/proc/self/status``, reset through
``/proc/self/clear_refs`` where allowed) over its resident size right before that single
fwd+bwd (inputs already allocated), i.e. what the call itself needed at its peak (torch CPU
allocations are invisible to ``tracemalloc``). ``getrusage().ru_maxrss`` is not used: after
``fork`` Linux carries the parent's peak into the child.

Usage::

    .venv/bin/python benchmarks/cpu_attention.py            # writes benchmarks/results/
    .venv/bin/python benchmarks/cpu_attention.py --quick    # smaller, no files
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import cpu_model  # noqa: E402
from torchrec_hstu.ops.common import AttentionOptions  # noqa: E402
from torchrec_hstu.ops.hstu_attention import hstu_attention  # noqa: E402
from torchrec_hstu.ops.jagged import dense_to_jagged, jagged_to_padded_dense  # noqa: E402

CASES: Dict[str, Dict] = {
    "a": dict(batch=128, max_len=200, heads=2, dim=64, fill=0.75, kind="uniform"),
    "b": dict(batch=32, max_len=1024, heads=2, dim=64, fill=0.20, kind="one_long"),
}
QUICK_CASES: Dict[str, Dict] = {
    "a": dict(batch=16, max_len=64, heads=2, dim=16, fill=0.75, kind="uniform"),
    "b": dict(batch=8, max_len=256, heads=2, dim=16, fill=0.20, kind="one_long"),
}


def make_lengths(batch: int, max_len: int, fill: float, kind: str, seed: int = 0) -> List[int]:
    """Lengths with ``sum / (batch * max_len) ~= fill``.

    ``uniform``: i.i.d. uniform in ``[2 * fill - 1, 1] * max_len`` (mean ``fill * max_len``).
    ``one_long``: one sequence of ``max_len`` among short ones, the rest sharing the remaining
    tokens (uniform around their mean).
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        low = max(1, int((2 * fill - 1) * max_len))
        lengths = torch.randint(low, max_len + 1, (batch,), generator=gen).tolist()
    elif kind == "one_long":
        rest = int(fill * batch * max_len) - max_len
        mean = rest / (batch - 1)
        short = torch.randint(1, int(2 * mean), (batch - 1,), generator=gen).double()
        short = torch.clamp((short * rest / short.sum()).round(), 1, max_len).long().tolist()
        lengths = [max_len] + short
        perm = torch.randperm(batch, generator=gen).tolist()
        lengths = [lengths[i] for i in perm]
    else:
        raise ValueError(f"kind must be 'uniform' or 'one_long'; got {kind!r}")
    return lengths


def make_inputs(case: Dict, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    lengths = make_lengths(case["batch"], case["max_len"], case["fill"], case["kind"], seed)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    total = int(offsets[-1])
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (total, case["heads"], case["dim"])
    q, k, v = (
        (torch.rand(shape, generator=gen) * 0.2 - 0.1).requires_grad_() for _ in range(3)
    )
    grad = torch.randn(shape, generator=gen)
    return q, k, v, offsets, grad


def padded_dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    alpha: float,
) -> torch.Tensor:
    """The padded-dense formulation: every sequence padded to ``max_len``, dense causal mask."""
    total, heads, dim_v = v.shape
    lengths = offsets[1:] - offsets[:-1]
    qd = jagged_to_padded_dense(q, offsets, max_len).transpose(1, 2)  # [B, H, N, D]
    kd = jagged_to_padded_dense(k, offsets, max_len).transpose(1, 2)
    vd = jagged_to_padded_dense(v, offsets, max_len).transpose(1, 2)
    positions = torch.arange(max_len)
    mask = (positions.view(1, -1, 1) >= positions.view(1, 1, -1)) & (
        positions.view(1, 1, -1) < lengths.view(-1, 1, 1)
    )  # [B, N, N]
    weights = F.silu(alpha * qd @ kd.transpose(-1, -2)) / max_len * mask.unsqueeze(1)
    out = (weights @ vd).transpose(1, 2)  # [B, N, H, Dv]
    return dense_to_jagged(out, offsets, total)


def ours_attention(q, k, v, offsets, max_len, alpha):
    return hstu_attention(q, k, v, offsets, max_len, alpha, AttentionOptions(causal=True))


VARIANTS = {"ours": ours_attention, "padded_dense": padded_dense_attention}


def fwd_bwd(variant: str, inputs, max_len: int, alpha: float) -> None:
    q, k, v, offsets, grad = inputs
    for t in (q, k, v):
        t.grad = None
    out = VARIANTS[variant](q, k, v, offsets, max_len, alpha)
    out.backward(grad)


def check_equal(inputs, max_len: int, alpha: float) -> float:
    """Max abs difference of outputs and input gradients between the variants."""
    results = []
    for variant in VARIANTS:
        q, k, v, offsets, grad = inputs
        for t in (q, k, v):
            t.grad = None
        out = VARIANTS[variant](q, k, v, offsets, max_len, alpha)
        out.backward(grad)
        results.append([out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    return max(float((a - b).abs().max()) for a, b in zip(*results))


def measure_memory_child(case_name: str, variant: str, quick: bool) -> None:
    """Runs in a fresh process: one fwd+bwd, prints the peak RSS increase in bytes."""
    torch.set_num_threads(2)
    case = (QUICK_CASES if quick else CASES)[case_name]
    inputs = make_inputs(case)
    alpha = 1.0 / case["dim"] ** 0.5
    reset_peak_rss()
    before = read_status_kib("VmRSS")
    fwd_bwd(variant, inputs, case["max_len"], alpha)
    after = read_status_kib("VmHWM")
    print(json.dumps({"peak_rss_increase_bytes": (after - before) * 1024}))


def read_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS`` now, ``VmHWM`` peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); harmless if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure_memory(case_name: str, variant: str, quick: bool) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", case_name, variant]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_rss_increase_bytes"])


def measure_time(case: Dict, warmup: int, repeats: int) -> Dict[str, List[float]]:
    inputs = make_inputs(case)
    alpha = 1.0 / case["dim"] ** 0.5
    times: Dict[str, List[float]] = {name: [] for name in VARIANTS}
    for _ in range(warmup):
        for name in VARIANTS:
            fwd_bwd(name, inputs, case["max_len"], alpha)
    for _ in range(repeats):
        for name in VARIANTS:  # interleaved, so machine load hits both alike
            start = time.perf_counter()
            fwd_bwd(name, inputs, case["max_len"], alpha)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, no result files")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", default="a,b")
    parser.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--tag", default="cpu2t", help="device part of the result file names")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        measure_memory_child(*args.memory_child, quick=args.quick)
        return

    torch.set_num_threads(2)
    cases = QUICK_CASES if args.quick else CASES
    rows = []
    for name in args.cases.split(","):
        case = cases[name]
        lengths = make_lengths(case["batch"], case["max_len"], case["fill"], case["kind"])
        actual_fill = sum(lengths) / (case["batch"] * case["max_len"])
        inputs = make_inputs(case)
        max_diff = check_equal(inputs, case["max_len"], 1.0 / case["dim"] ** 0.5)
        load_before = os.getloadavg()[0]
        times = measure_time(case, args.warmup, args.repeats)
        load_after = os.getloadavg()[0]
        memory = {variant: measure_memory(name, variant, args.quick) for variant in VARIANTS}
        row = dict(
            case=name,
            **case,
            actual_fill=round(actual_fill, 4),
            tokens=sum(lengths),
            max_abs_diff=max_diff,
            load_avg_1min=[round(load_before, 2), round(load_after, 2)],
            ms_median={v: round(statistics.median(t), 2) for v, t in times.items()},
            ms_min={v: round(min(t), 2) for v, t in times.items()},
            ms_all={v: [round(x, 2) for x in t] for v, t in times.items()},
            peak_rss_increase_mb={v: round(m / 2**20, 1) for v, m in memory.items()},
        )
        row["speedup"] = round(row["ms_median"]["padded_dense"] / row["ms_median"]["ours"], 2)
        row["memory_ratio"] = round(
            row["peak_rss_increase_mb"]["ours"] / max(row["peak_rss_increase_mb"]["padded_dense"], 1e-9), 3
        )
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.quick:
        return
    date = datetime.date.today().isoformat()
    device = args.tag
    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    meta = dict(
        date=date,
        device=f"{cpu_model()}, {os.cpu_count()} cores visible, torch.set_num_threads(2)",
        torch=torch.__version__,
        command=command,
        memory_method="peak RSS (VmHWM) minus RSS before one fwd+bwd, in a fresh subprocess per variant",
        time_method=f"median of {args.repeats} fwd+bwd after {args.warmup} warmups, variants interleaved",
    )
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{date}-{device}-cpu-attention")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown_table(meta, rows))
    print(f"wrote {stem}.json and {stem}.md")


def markdown_table(meta: Dict, rows: List[Dict]) -> str:
    lines = [
        f"# CPU HSTU attention, fwd+bwd: ours (PYTORCH, length-grouped) vs padded-dense",
        "",
        f"- date: {meta['date']}; device: {meta['device']}; torch {meta['torch']}",
        f"- command: `{meta['command']}`",
        f"- time: {meta['time_method']}",
        f"- memory: {meta['memory_method']}",
        "",
        "| case | B | N | H | D | fill | ours ms (min) | padded ms (min) | speedup | ours peak MB | padded peak MB | mem ratio | max abs diff | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} ({r['kind']}) | {r['batch']} | {r['max_len']} | {r['heads']} | {r['dim']} | "
            f"{r['actual_fill']:.2f} | {r['ms_median']['ours']} ({r['ms_min']['ours']}) | "
            f"{r['ms_median']['padded_dense']} ({r['ms_min']['padded_dense']}) | "
            f"{r['speedup']}x | {r['peak_rss_increase_mb']['ours']} | "
            f"{r['peak_rss_increase_mb']['padded_dense']} | {r['memory_ratio']} | {r['max_abs_diff']:.1e} | "
            f"{r['load_avg_1min'][0]}-{r['load_avg_1min'][1]} |"
        )
    lines += [
        "",
        "ms: median (min) of the fwd+bwd times; speedup = padded median / ours median; mem ratio = ours /",
        "padded peak; max abs diff: outputs and q/k/v gradients of the two variants; load avg: the",
        "machine's 1-minute load average before/after the timing (2 cores, shared with other jobs).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
