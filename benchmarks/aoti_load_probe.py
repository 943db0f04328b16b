"""Which AOTInductor packages compile, load and run on a device: a bisection of load crashes.

On the H100 (torch 2.11.0+cu130, 2026-11-25) the CUDA package of the two-channel ranking model
compiled but ``aoti_load_package`` died with a segmentation fault inside the C++ loader, and a
crash takes the Python process (and any pytest worker) with it. This script therefore builds
each case in its own subprocess, from the smallest program to the whole model: one process
exports, compiles, saves the inputs and the eager output, and loads the package itself (as the
GPU test does, with torchrec and the CPU-only fbgemm build imported for the ranking models); a
second, fresh process loads it with only torch and our op modules imported (as ``predict`` does)
and compares with the saved eager output. Each step reports the last stage it reached and its
exit status (``-11``: SIGSEGV; ``None``: timed out), so one device call says which ingredient the
loader cannot take. Step logs stream to ``--out-dir`` as the steps run, a watchdog in each step
dumps its Python stacks before its timeout, and the JSON is rewritten as each case ends: a first
device run that printed only at the end timed out after 420 s with nothing to show.

Its answer (H100, third session): every case crashed, ``nn.Linear`` included, so the cause lay
below our code; ``aoti_load_steps.py`` then found it (a statically linked libstdc++), fixed in
``torchrec_hstu/aoti_toolchain.py``.

==================  ======================================================================
case                program
==================  ======================================================================
linear              ``nn.Linear`` on a dynamic batch (does AOTI load at all here?)
triton_op           ``hstu_attention(kernel=TRITON)``: our Python custom op, bf16 (CUDA)
fp8_op              ``hstu_attention(fp8_quant_mode=2)``: the opaque FP8 op
ranking_pytorch     the two-channel ranking model, PYTORCH kernel (no custom op)
ranking_triton      the same model, TRITON kernel (CUDA)
ranking_triton_fp8  the same model, TRITON kernel, FP8 mode 2 (CUDA)
==================  ======================================================================

On CUDA the models run under bfloat16 autocast (float32 CUDA export hit an inductor codegen
error, ``NameError: name 's80' is not defined``, on torch 2.11). A case whose fresh-process
load crashes is loaded again under ``gdb`` when the machine has it, for a native backtrace.

Usage (device; repo root, ``.whl`` installed as in ``benchmarks/run_device_suite.sh``)::

    python3 benchmarks/aoti_load_probe.py --device cuda --out-dir "$OUT"
    .venv/bin/python benchmarks/aoti_load_probe.py --device cpu --cases linear fp8_op   # here
"""

import argparse
import copy
import datetime
import faulthandler
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.common import run_logged  # noqa: E402

CASES = ["linear", "triton_op", "fp8_op", "ranking_pytorch", "ranking_triton", "ranking_triton_fp8"]
CUDA_ONLY = {"triton_op", "ranking_triton", "ranking_triton_fp8"}
RANKING_CONFIG = os.path.join(REPO, "examples", "configs", "ranking_two_channel.pbtxt")


def stage(name: str, detail: str = "") -> None:
    """One progress line the parent reads back (flushed: a crash may follow)."""
    print(f"STAGE {name} {detail}".rstrip(), flush=True)


# -- the cases (run in the child) -------------------------------------------------------------


def _attention_case(device: str, fp8_quant_mode: int, kernel: str) -> Tuple[Any, Tuple[Any, ...], Any]:
    import torch

    from torchrec_hstu.ops import AttentionOptions, hstu_attention

    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            max_seq_len = lengths.max().item()
            torch._check(max_seq_len >= 1)
            torch._check(max_seq_len <= 512)
            options = AttentionOptions(fp8_quant_mode=fp8_quant_mode, max_attn_len=0)
            return hstu_attention(q, k, v, offsets, max_seq_len, 1.0 / 8, options, kernel=kernel)

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([70, 1, 33])
    total = int(lengths.sum())
    q, k, v = (torch.randn(total, 2, 64, generator=generator).to(device, dtype) for _ in range(3))
    args = (q, k, v, lengths.to(device))
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    batch = torch.export.Dim("batch", min=2, max=64)
    dynamic = ({0: tokens}, {0: tokens}, {0: tokens}, {0: batch})
    return Attention().eval(), args, dynamic


def compile_case(case: str, device: str, workdir: str) -> None:
    """Export and compile ``case``, save its inputs and eager output, then load it here too.

    Prints a STAGE line after each step; the in-process load comes last, after everything the
    fresh-process load needs is on disk.
    """
    import torch

    from torchrec_hstu.export import (
        autocast_context,
        build_model_from_config,
        compile_package,
        default_inductor_configs,
        example_inputs,
        export_program,
    )

    stage("started", f"torch {torch.__version__}")
    package = os.path.join(workdir, f"{case}.pt2")
    if case.startswith("ranking"):
        from torchrec_hstu.config import load_config

        autocast_dtype = torch.bfloat16 if device == "cuda" else None
        kernel = "PYTORCH" if case == "ranking_pytorch" else "TRITON"
        fp8_quant_mode = 2 if case.endswith("fp8") else -1
        torch.manual_seed(0)
        model = build_model_from_config(
            load_config(RANKING_CONFIG), num_items=1000, kernel=kernel, fp8_quant_mode=fp8_quant_mode
        ).eval()
        inputs = list(example_inputs(model.to(device), max_seq_len=256, batch_size=3, seed=1).values())
        # The machine's fbgemm has no CUDA kernels: the eager oracle keeps its table on CPU.
        eager = copy.deepcopy(model).to("cpu").place(device).eval()
        with torch.inference_mode(), autocast_context(device, autocast_dtype):
            want = eager(*inputs)
        program, signature = export_program(model, 8, 256, None, autocast_dtype)
        stage("exported")
        compile_package(program, signature, package)
    else:
        if case == "linear":
            model = torch.nn.Linear(16, 4).to(device).eval()
            inputs = [torch.randn(5, 16, device=device)]
            dynamic: Any = ({0: torch.export.Dim("batch", min=1, max=64)},)
        else:
            model, args, dynamic = _attention_case(device, 2 if case == "fp8_op" else -1,
                                                   "TRITON" if case == "triton_op" else "AUTO")
            inputs = list(args)
        with torch.inference_mode():
            want = model(*inputs)
        program = torch.export.export(model, tuple(inputs), dynamic_shapes=dynamic, strict=False)
        stage("exported")
        torch._inductor.aoti_compile_and_package(
            program, package_path=package, inductor_configs=default_inductor_configs(device)
        )
    torch.save({"inputs": [x.cpu() for x in inputs], "want": want.cpu()}, package + ".io.pt")
    stage("compiled")
    loaded_modules = sorted(m for m in ("torchrec", "fbgemm_gpu") if m in sys.modules)
    stage("loading_same_process")
    torch._inductor.aoti_load_package(package)
    stage("loaded_same_process", f"with {loaded_modules or 'no torchrec/fbgemm'} imported")


def load_case(case: str, device: str, workdir: str) -> None:
    """Load ``case``'s package in this fresh process (torch + our op modules only) and run it."""
    import torch

    import torchrec_hstu.ops  # noqa: F401 - registers the FP8 export op
    if device == "cuda":
        import torchrec_hstu.ops.triton.hstu_attention  # noqa: F401 - registers the Triton op

    package = os.path.join(workdir, f"{case}.pt2")
    saved = torch.load(package + ".io.pt", weights_only=True)
    loaded_modules = sorted(m for m in ("torchrec", "fbgemm_gpu") if m in sys.modules)
    stage("fresh_started", f"with {loaded_modules or 'no torchrec/fbgemm'} imported")
    runner = torch._inductor.aoti_load_package(package)
    stage("loaded")
    with torch.inference_mode():
        got = runner(*[x.to(device) for x in saved["inputs"]])
    diff = (got.float().cpu() - saved["want"].float()).abs().max().item()
    stage("ran", f"max|package - eager| {diff:.2e}")


# -- the parent ---------------------------------------------------------------------------------


def _last_stage(output: str) -> Tuple[str, str]:
    last, detail = "none", ""
    for line in output.splitlines():
        if line.startswith("STAGE "):
            parts = line.split(" ", 2)
            last, detail = parts[1], parts[2] if len(parts) > 2 else ""
    return last, detail


def _child(step: str, case: str, device: str, workdir: str, timeout_s: float, log_path: str) -> Dict[str, Any]:
    """Run one step of ``case`` in a subprocess whose output streams to ``log_path``.

    The log is written as the child runs, so a step that hangs or outlives the device call still
    leaves its output; the child's faulthandler watchdog dumps every thread's Python stack and
    exits a few seconds before ``timeout_s``, so a hang shows where it hangs.
    """
    watchdog_s = max(1.0, timeout_s - 5.0)
    command = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), f"--{step}", case,
               "--device", device, "--workdir", workdir, "--watchdog-s", str(watchdog_s)]
    returncode, seconds, output = run_logged(command, log_path, timeout_s, cwd=REPO)
    last, detail = _last_stage(output)
    return {"returncode": returncode, "last_stage": last, "detail": detail, "seconds": seconds,
            "log": os.path.basename(log_path)}


def _gdb_backtrace(case: str, device: str, workdir: str) -> Optional[str]:
    """A native backtrace of the fresh-process load, where the machine has gdb."""
    if shutil.which("gdb") is None:
        return None
    command = ["gdb", "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, os.path.abspath(__file__),
               "--load-case", case, "--device", device, "--workdir", workdir]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    except subprocess.TimeoutExpired:
        return "gdb timed out"
    lines = done.stdout.splitlines()
    first = next((i for i, line in enumerate(lines) if "SIGSEGV" in line), max(0, len(lines) - 60))
    return "\n".join(lines[first:first + 60])


def probe(case: str, device: str, workdir: str, log_dir: str, deadline: float,
          compile_timeout_s: float, load_timeout_s: float) -> Dict[str, Any]:
    """Compile (and load in the same process), then load and run in a fresh process.

    Every step is bounded by its own timeout and by the run's ``deadline`` (``time.monotonic``);
    a step with under 10 s left is not started.
    """
    result: Dict[str, Any] = {"case": case}
    for step, key, timeout_s in (("compile-case", "compile", compile_timeout_s),
                                 ("load-case", "fresh_load", load_timeout_s)):
        left = min(timeout_s, deadline - time.monotonic())
        if left < 10:
            break
        log_path = os.path.join(log_dir, f"aoti-probe-{case}-{key}.log")
        result[key] = _child(step, case, device, workdir, left, log_path)
        if key == "compile" and result[key]["last_stage"] not in ("compiled", "loading_same_process", "loaded_same_process"):
            break
    load = result.get("fresh_load")
    if load and load["returncode"] not in (0, None) and load["last_stage"] == "fresh_started":
        result["gdb_backtrace"] = _gdb_backtrace(case, device, workdir)
    return result


def _summary(step: Optional[Dict[str, Any]]) -> str:
    if step is None:
        return "not run"
    status = "ok" if step["returncode"] == 0 else f"rc={step['returncode']}"
    return f"{status}, last stage {step['last_stage']} {step['detail']} ({step['seconds']} s)".replace("  ", " ")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--cases", nargs="+", default=None, choices=CASES)
    parser.add_argument("--parallel", type=int, default=3, help="cases run at once")
    parser.add_argument("--budget-s", type=float, default=600.0, help="the whole run; steps past it are not started")
    parser.add_argument("--compile-timeout-s", type=float, default=240.0, help="per compile step of a case")
    parser.add_argument("--load-timeout-s", type=float, default=90.0, help="per fresh-process load step")
    parser.add_argument("--out-dir", default=None, help="write aoti-load-probe.json and the step logs here")
    parser.add_argument("--compile-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--load-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--watchdog-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_case or args.load_case:
        if args.watchdog_s > 0:
            faulthandler.dump_traceback_later(args.watchdog_s, exit=True)
        if args.compile_case:
            compile_case(args.compile_case, args.device, args.workdir)
        else:
            load_case(args.load_case, args.device, args.workdir)
        return 0

    import torch

    deadline = time.monotonic() + args.budget_s
    cases = args.cases or [c for c in CASES if args.device == "cuda" or c not in CUDA_ONLY]
    workdir = tempfile.mkdtemp(prefix="aoti_probe_")
    log_dir = args.out_dir or workdir
    os.makedirs(log_dir, exist_ok=True)
    payload = {"date": datetime.date.today().isoformat(),
               "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__,
               "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + list(argv or sys.argv[1:])),
               "results": []}
    from concurrent.futures import ThreadPoolExecutor, as_completed

    # Results are printed and written as each case ends: the device call may end first.
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(probe, case, args.device, workdir, log_dir, deadline,
                               args.compile_timeout_s, args.load_timeout_s) for case in cases]
        for future in as_completed(futures):
            result = future.result()
            payload["results"].append(result)
            print(f"{result['case']:20s} compile: {_summary(result.get('compile'))}", flush=True)
            print(f"{'':20s} fresh load: {_summary(result.get('fresh_load'))}", flush=True)
            if result.get("gdb_backtrace"):
                print(result["gdb_backtrace"], flush=True)
            if args.out_dir:
                with open(os.path.join(args.out_dir, "aoti-load-probe.json"), "w") as handle:
                    json.dump(payload, handle, indent=2)
                    handle.write("\n")
    results = payload["results"]
    ok = len(results) == len(cases) and all(
        r.get("compile", {}).get("returncode") == 0 and r.get("fresh_load", {}).get("returncode") == 0 for r in results
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
