"""Pieces the benchmark scripts share (imported as ``benchmarks.common`` with the repo root on
``sys.path``, as every script here sets it)."""

import platform
import subprocess
import time
from typing import Dict, Optional, Sequence, Tuple

import torch


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the number of torch threads, for result files."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def run_logged(command: Sequence[str], log_path: str, timeout_s: float, env: Optional[Dict[str, str]] = None,
               cwd: Optional[str] = None) -> Tuple[Optional[int], float, str]:
    """Run ``command`` with its stdout and stderr streaming to ``log_path``.

    The log is written as the command runs, so a step that hangs or outlives a device call still
    leaves its output.

    Args:
        command: the program and its arguments.
        log_path: file for stdout + stderr (overwritten).
        timeout_s: seconds before the command is killed.
        env: the environment (default: this process's).
        cwd: working directory (default: this process's).

    Returns:
        ``(returncode, seconds, log text)``; ``returncode`` is None when ``timeout_s`` passed.
    """
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            returncode: Optional[int] = subprocess.run(
                list(command), stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, env=env, cwd=cwd
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    with open(log_path) as log:
        return returncode, round(time.perf_counter() - start, 1), log.read()
