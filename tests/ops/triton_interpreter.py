"""Run a script on Triton's CPU interpreter (``TRITON_INTERPRET=1``) in a subprocess.

The interpreter must be chosen before Triton compiles anything, so the kernels run in a fresh
process; the script prints one JSON object as its last line, which is returned.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

REPO = str(Path(__file__).resolve().parents[2])

# Triton 3.6's interpreter converts loop bounds with int(ndarray), which numpy >= 2.4 refuses for
# 1-element arrays; the patch reads the element instead.
_PREAMBLE = textwrap.dedent(
    """
    import triton.runtime.interpreter as interpreter

    _patch = interpreter._patch_lang_tensor
    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = _patched
    """
)


def run_in_interpreter(script: str, tmp_path: Path, timeout_s: int = 300) -> Dict[str, Any]:
    """Run ``script`` (after the interpreter patch) and return its last stdout line as JSON."""
    path = tmp_path / "triton_interpreter_script.py"
    path.write_text(_PREAMBLE + textwrap.dedent(script))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env,
                            timeout=timeout_s)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
