"""Helpers of the distributed tests: launch ``examples/train_dmp.py`` under torchrun.

Every launch gets a free rendezvous port (``--standalone``), one OpenMP thread per rank (two
ranks share the CI machine's 2 cores), and a wall-clock limit after which the whole process
group (torchrun and its workers) is killed, so a hang fails the test instead of CI.
"""

import json
import os
import signal
import subprocess
import sys
from typing import Dict, List, Sequence

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_DMP = os.path.join(REPO, "examples", "train_dmp.py")
for path in (REPO, os.path.join(REPO, "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)


class LaunchResult:
    def __init__(self, returncode: int, output: str, seconds: float) -> None:
        self.returncode = returncode
        self.output = output
        self.seconds = seconds

    def metrics(self, output_dir: str) -> Dict:
        with open(os.path.join(output_dir, "metrics.json")) as f:
            return json.load(f)


def torchrun(nproc: int, argv: Sequence[str], timeout: float = 90.0) -> LaunchResult:
    """Run ``torchrun --standalone --nproc_per_node=nproc examples/train_dmp.py argv``.

    Raises:
        AssertionError: it did not finish within ``timeout`` seconds (everything is killed).
    """
    import time

    cmd: List[str] = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "--monitor-interval=0.2", TRAIN_DMP, *argv,
    ]
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout} s (killed):\n{output[-4000:]}")
    return LaunchResult(proc.returncode, output, time.monotonic() - start)


@pytest.fixture(scope="session")
def launch():
    """The :func:`torchrun` helper."""
    return torchrun
