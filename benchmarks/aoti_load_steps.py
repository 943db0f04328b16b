"""The steps of loading one small AOTInductor package, one process each: where a load crashes.

``benchmarks/aoti_load_probe.py`` showed (H100, torch 2.11.0+cu130, 2026-11-25) that
``aoti_load_package`` died with SIGSEGV for every CUDA package, a single ``nn.Linear`` included,
in the compiling process and in a fresh one alike. This script takes that call apart for an
``nn.Linear`` package built with each link mode of :mod:`torchrec_hstu.aoti_toolchain`
(``--variants``). For each package it runs, each in its own process with a watchdog:

=========  ==========================================================================
step       what it does
=========  ==========================================================================
metadata   ``AOTIModelPackageLoader.load_metadata_from_package`` (reads the archive only)
dlopen     extracts the archive and ``ctypes.CDLL``s the model library (static init only)
runner     ``AOTIModelContainerRunner{Cuda,Cpu}`` on the extracted library, then one run
package    ``aoti_load_package`` (the public path), then one run
=========  ==========================================================================

and lists the archive, ``ldd`` of the library, the compiler command lines of the wrapped link
modes and, where ``strace`` exists, the programs the package step starts. Where a C compiler
exists, the runner and package steps run with ``benchmarks/tools/segv_backtrace.c`` preloaded,
which prints the native backtrace of a crash (the device has no gdb). Everything streams to
``--out-dir`` as it runs.

What it found on the device: the runner step crashed inside the model library's static
libstdc++ (``std::regex`` in ``parse_device_str``), the machine's ``g++`` links libstdc++
statically, and the ``exclude_libs`` mode loads and runs (``torchrec_hstu/aoti_toolchain.py``).

Usage (device, repo root)::

    python3 benchmarks/aoti_load_steps.py --device cuda --out-dir "$OUT/load_steps"
    .venv/bin/python benchmarks/aoti_load_steps.py --device cpu --steps runner package   # here
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import run_logged  # noqa: E402
from torchrec_hstu.aoti_toolchain import ENV_ARGV_LOG, ENV_LINK_MODE, LINK_MODES  # noqa: E402

# Each variant is a link mode of torchrec_hstu.aoti_toolchain (the package configs of
# torchrec_hstu.export.default_inductor_configs with $TORCHREC_HSTU_AOTI_LINK set to it).
VARIANTS = list(LINK_MODES)
STEPS = ("metadata", "dlopen", "runner", "package")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def compile_variant(variant: str, device: str, package: str) -> None:
    import torch

    from torchrec_hstu.export import default_inductor_configs

    model = torch.nn.Linear(16, 4).to(device).eval()
    example = torch.randn(5, 16, device=device)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    os.environ[ENV_LINK_MODE] = variant
    configs = default_inductor_configs(device)
    _log(f"compiling with {configs}")
    torch._inductor.aoti_compile_and_package(program, package_path=package, inductor_configs=configs)
    with torch.inference_mode():
        torch.save({"x": example.cpu(), "want": model(example).cpu()}, package + ".io.pt")
    _log("compiled")


def _model_libraries(package: str) -> List[str]:
    """Extract ``package`` (once) and return the shared libraries in it (a model has one)."""
    target = package + ".extracted"
    if not os.path.isdir(target):
        with zipfile.ZipFile(package) as archive:
            archive.extractall(target)
    return glob.glob(os.path.join(target, "**", "*.so"), recursive=True)


def run_step(step: str, device: str, package: str) -> None:
    import torch

    _log(f"step {step}: start")
    saved = torch.load(package + ".io.pt", weights_only=True)
    if device == "cuda" and step in ("runner", "package"):
        torch.zeros(1, device=device)  # a CUDA context exists before the loader runs, as in predict
        _log("cuda context ready")
    if step == "metadata":
        metadata = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(package, "model")
        _log(f"metadata {dict(metadata)}")
        return
    if step == "package":
        runner = torch._inductor.aoti_load_package(package)
        _log("loaded")
        got = runner(saved["x"].to(device))
    else:
        (library,) = _model_libraries(package)
        if step == "dlopen":
            import ctypes

            ctypes.CDLL(library)
            _log(f"dlopen ok: {library}")
            return
        cubin_dir = os.path.dirname(library)
        if device == "cuda":
            runner = torch._C._aoti.AOTIModelContainerRunnerCuda(library, 1, "cuda", cubin_dir)
        else:
            runner = torch._C._aoti.AOTIModelContainerRunnerCpu(library, 1)
        _log("runner constructed")
        (got,) = runner.run([saved["x"].to(device)])
    diff = (got.float().cpu() - saved["want"].float()).abs().max().item()
    _log(f"ran: max|package - eager| {diff:.2e}")


def _subprocess(arguments: List[str], log_path: str, timeout_s: float, prefix: Sequence[str] = (),
                preload: Optional[str] = None, extra_env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    command = list(prefix) + [sys.executable, "-X", "faulthandler", os.path.abspath(__file__)] + arguments
    env = dict(os.environ, TORCH_CPP_LOG_LEVEL="INFO", **(extra_env or {}))
    if preload and prefix:  # strace passes it to the traced program only
        command = list(prefix) + ["-E", f"LD_PRELOAD={preload}"] + command[len(prefix):]
    elif preload:
        env["LD_PRELOAD"] = preload
    returncode, seconds, output = run_logged(command, log_path, timeout_s, env=env)
    lines = [line.rstrip() for line in output.splitlines() if line.startswith("[")]
    return {"returncode": returncode, "seconds": seconds, "last": lines[-1] if lines else "",
            "command": " ".join(command), "log": os.path.basename(log_path)}


def _shell(command: List[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{command[0]}: {err}"


def build_backtrace_handler(workdir: str) -> Optional[str]:
    """Compile ``tools/segv_backtrace.c`` into ``workdir``; None without a C compiler."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "segv_backtrace.c")
    library = os.path.join(workdir, "segv_backtrace.so")
    done = subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", library, source], capture_output=True, text=True)
    return library if done.returncode == 0 else None


def diagnose(variant: str, device: str, workdir: str, out_dir: str, step_timeout_s: float,
             backtrace_handler: Optional[str], steps: Sequence[str]) -> Dict[str, Any]:
    package = os.path.join(workdir, f"{variant}.pt2")
    args = ["--device", device, "--package", package, "--step-timeout-s", str(step_timeout_s)]
    result: Dict[str, Any] = {"variant": variant}
    # A cache per variant: a cached library of another link mode must not be reused.
    compile_env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(workdir, f"{variant}-inductor-cache"),
                   ENV_ARGV_LOG: os.path.join(out_dir, f"{variant}-cxx-argv.txt")}
    result["compile"] = _subprocess(["--compile-variant", variant] + args,
                                    os.path.join(out_dir, f"{variant}-compile.log"), 300, extra_env=compile_env)
    if result["compile"]["returncode"] != 0:
        return result
    with zipfile.ZipFile(package) as archive:
        result["archive"] = [f"{info.filename} {info.file_size}" for info in archive.infolist()]
    libraries = _model_libraries(package)
    result["ldd"] = _shell(["ldd"] + libraries) if libraries else "no .so in the archive"
    for step in steps:
        prefix: List[str] = []
        if step == "package" and shutil.which("strace"):
            prefix = ["strace", "-f", "-e", "trace=execve", "-o", os.path.join(out_dir, f"{variant}-strace.txt")]
        preload = backtrace_handler if step in ("runner", "package") else None
        result[step] = _subprocess(["--step", step] + args, os.path.join(out_dir, f"{variant}-{step}.log"),
                                   step_timeout_s, prefix, preload)
        _log(f"{variant:24s} {step:9s} rc={result[step]['returncode']} {result[step]['seconds']} s "
             f"{result[step]['last']}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--step-timeout-s", type=float, default=100.0)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--keep-packages", action="store_true", help="copy each package into --out-dir")
    parser.add_argument("--compile-variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--step", default=None, choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--package", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_variant:
        compile_variant(args.compile_variant, args.device, args.package)
        return 0
    if args.step:
        import faulthandler

        faulthandler.dump_traceback_later(args.step_timeout_s - 5, exit=True)
        run_step(args.step, args.device, args.package)
        return 0
    workdir = tempfile.mkdtemp(prefix="aoti_steps_")
    out_dir = args.out_dir or workdir
    os.makedirs(out_dir, exist_ok=True)
    backtrace_handler = build_backtrace_handler(workdir)
    _log(f"native backtrace handler: {backtrace_handler or 'none (no C compiler)'}")
    with ThreadPoolExecutor(max_workers=len(args.variants)) as pool:
        results = list(pool.map(
            lambda v: diagnose(v, args.device, workdir, out_dir, args.step_timeout_s, backtrace_handler, args.steps),
            args.variants))
    if args.keep_packages:
        for variant in args.variants:
            for suffix in (".pt2", ".pt2.io.pt"):
                if os.path.exists(os.path.join(workdir, variant + suffix)):
                    shutil.copy(os.path.join(workdir, variant + suffix), out_dir)
    with open(os.path.join(out_dir, "aoti-load-steps.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    ok = all(r.get(step, {}).get("returncode") == 0 for r in results for step in args.steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
