"""How the C++ library inside an AOTInductor package is linked.

On the H100 device (torch 2.11.0+cu130) every CUDA package, a single ``nn.Linear`` included,
died with SIGSEGV when loaded. The cause is the machine's compiler, ``/opt/gcc/bin/g++``: it
links libstdc++ into the package's ``.so`` *statically* (inductor's command has no ``-static``
option; the library has no ``NEEDED libstdc++.so.6``) and exports those symbols, while the
loading process already has the shared libstdc++. Some of the library's libstdc++ calls then bind
to the shared copy and others stay in the static one, and the first ``std::regex`` the model's
constructor builds (``torch::aot_inductor::parse_device_str``) looks up a locale facet of one copy
in a locale of the other: a segmentation fault there, ``std::bad_cast`` with this machine's
libstdc++ (the native backtrace and the measurements are in ``benchmarks/results/``, taken with
``benchmarks/aoti_load_steps.py``).

The fix is at link time, and it is harmless where libstdc++ is linked dynamically: inductor's C++
compiler (``torch._inductor.config.cpp.cxx``) is pointed at a small wrapper script around the
real ``g++`` that adds ``-Wl,--exclude-libs,ALL`` to link steps, so the symbols of any static
archive stay local to the library and its calls stay in its own copy. ``-Wl,-Bsymbolic`` was
tried too and still crashed on the device.

:func:`link_configs` returns the inductor configs (``$TORCHREC_HSTU_AOTI_LINK=torch`` turns the
wrapper off); :func:`torchrec_hstu.export.default_inductor_configs` includes them.
"""

import hashlib
import os
import shutil
import stat
import sys
import tempfile
from typing import Any, Dict, List, Optional

# mode -> extra linker options (None: inductor's own command).
LINK_MODES: Dict[str, Optional[List[str]]] = {
    "torch": None,
    "exclude_libs": ["-Wl,--exclude-libs,ALL"],
}
DEFAULT_LINK_MODE = "exclude_libs"
ENV_LINK_MODE = "TORCHREC_HSTU_AOTI_LINK"
# When set, the wrapper appends each command line it runs to this file (for diagnosis and tests).
ENV_ARGV_LOG = "TORCHREC_HSTU_AOTI_CXX_LOG"


def _script(compiler: str, link_options: List[str]) -> str:
    # The options go to link steps only (``-shared``): gcc counts ``-Wl,`` options as linker
    # inputs, so on a header precompile or a ``-c`` call they would turn it into a link.
    options = " ".join(link_options)
    return f"""#!/bin/sh
# Written by torchrec_hstu.aoti_toolchain: runs {compiler} for inductor and adds
# "{options}" to link steps, so a statically linked libstdc++ stays private to the library.
extra=""
for arg do
  if [ "$arg" = "-shared" ]; then extra="{options}"; fi
done
if [ -n "${{{ENV_ARGV_LOG}:-}}" ]; then echo "{compiler} $* $extra" >> "${ENV_ARGV_LOG}"; fi
exec "{compiler}" "$@" $extra
"""


def compiler_wrapper(mode: str = DEFAULT_LINK_MODE, compiler: Optional[str] = None,
                     directory: Optional[str] = None) -> str:
    """Write (once) the compiler wrapper of ``mode`` and return its path.

    The file name ends in ``g++`` because inductor picks its GCC flags by the compiler's name.

    Args:
        mode: a key of :data:`LINK_MODES` other than ``"torch"``.
        compiler: the real compiler (default: ``$CXX``, else ``g++`` on ``PATH``).
        directory: where to write it (default: a per-user folder under the temp dir).

    Returns:
        The wrapper's path.

    Example::

        configs = {"cpp.cxx": (compiler_wrapper(),)}
        torch._inductor.aoti_compile_and_package(program, inductor_configs=configs)
    """
    if LINK_MODES.get(mode) is None:
        raise ValueError(f"mode must be one of {[k for k, v in LINK_MODES.items() if v]}, got {mode!r}")
    compiler = compiler or os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("AOTInductor needs a C++ compiler: no g++ on PATH and CXX is not set")
    text = _script(compiler, LINK_MODES[mode])
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    directory = directory or os.path.join(tempfile.gettempdir(), f"torchrec_hstu_{os.getuid()}")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{mode}-{digest}-g++")
    if not os.path.exists(path):
        # Written under a private name and renamed: parallel compiles may race to create it.
        scratch = f"{path}.{os.getpid()}"
        with open(scratch, "w") as handle:
            handle.write(text)
        os.chmod(scratch, os.stat(scratch).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(scratch, path)
    return path


def link_configs(mode: Optional[str] = None) -> Dict[str, Any]:
    """Inductor configs that link a package's C++ library with ``mode``.

    Args:
        mode: a key of :data:`LINK_MODES`; default ``$TORCHREC_HSTU_AOTI_LINK``, else
            :data:`DEFAULT_LINK_MODE`. ``"torch"`` gives ``{}`` (inductor's own command).

    Returns:
        ``{"cpp.cxx": (wrapper,)}`` on Linux (GNU-style linkers), ``{}`` for ``"torch"`` or
        elsewhere.

    Raises:
        ValueError: an unknown mode.
    """
    mode = mode or os.environ.get(ENV_LINK_MODE) or DEFAULT_LINK_MODE
    if mode not in LINK_MODES:
        raise ValueError(f"{ENV_LINK_MODE} (mode) must be one of {sorted(LINK_MODES)}, got {mode!r}")
    if LINK_MODES[mode] is None or not sys.platform.startswith("linux"):
        return {}
    return {"cpp.cxx": (compiler_wrapper(mode),)}
