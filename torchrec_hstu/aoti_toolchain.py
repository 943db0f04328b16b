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
real compiler (the one inductor would pick) that adds ``-Wl,--exclude-libs,ALL`` to link steps,
so the symbols of any static archive stay local to the library and its calls stay in its own
copy. ``-Wl,-Bsymbolic`` was tried too and still crashed on the device. The wrapper keeps the
compiler's file name at its end, because inductor picks GCC or clang flags by that name.

:func:`link_configs` returns the inductor configs (``$TORCHREC_HSTU_AOTI_LINK=torch`` turns the
wrapper off); :func:`torchrec_hstu.export.default_inductor_configs` includes them.
"""

import hashlib
import logging
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, cast

logger = logging.getLogger(__name__)

# mode -> extra linker options (None: inductor's own command).
LINK_MODES: Dict[str, Optional[List[str]]] = {
    "torch": None,
    "exclude_libs": ["-Wl,--exclude-libs,ALL"],
}
DEFAULT_LINK_MODE = "exclude_libs"
ENV_LINK_MODE = "TORCHREC_HSTU_AOTI_LINK"
# Where the wrapper scripts go (default: a private folder under the temp dir); it must allow
# running files, so a ``noexec`` temp dir needs it set.
ENV_WRAPPER_DIR = "TORCHREC_HSTU_AOTI_WRAPPER_DIR"
# When set, the wrapper appends each command line it runs to this file (for diagnosis and tests).
ENV_ARGV_LOG = "TORCHREC_HSTU_AOTI_CXX_LOG"

_checked: Dict[str, bool] = {}


def _script(compiler: str, link_options: List[str]) -> str:
    # The options go to link steps only (``-shared``): gcc counts ``-Wl,`` options as linker
    # inputs, so on a header precompile or a ``-c`` call they would turn it into a link.
    options = " ".join(shlex.quote(option) for option in link_options)
    return f"""#!/bin/sh
# Written by torchrec_hstu.aoti_toolchain: runs the compiler below for inductor and adds
# {options} to link steps, so a statically linked libstdc++ stays private to the library.
compiler={shlex.quote(compiler)}
link=""
for arg do
  if [ "$arg" = "-shared" ]; then link=1; fi
done
if [ -n "${{{ENV_ARGV_LOG}:-}}" ]; then
  if [ -n "$link" ]; then printf '%s\\n' "$compiler $* {options}"; else printf '%s\\n' "$compiler $*"; fi >> "${ENV_ARGV_LOG}"
fi
if [ -n "$link" ]; then exec "$compiler" "$@" {options}; fi
exec "$compiler" "$@"
"""


def _default_compiler() -> Optional[str]:
    """The compiler inductor would run: its own choice (``config.cpp.cxx``, ``$CXX``), else g++."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 - inductor raises several kinds when it finds none
        logger.debug("inductor found no C++ compiler (%s); trying $CXX and g++", err)
        return os.environ.get("CXX") or shutil.which("g++")


def _private_directory(directory: Optional[str]) -> str:
    if directory is None:
        directory = os.environ.get(ENV_WRAPPER_DIR) or os.path.join(
            tempfile.gettempdir(), f"torchrec_hstu_aoti_{os.getuid()}"
        )
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # A predictable name under a shared temp dir: use it only if it is ours and private,
        # or another user could plant a "compiler" in it.
        info = os.stat(directory)
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RuntimeError(
                f"{directory} (AOTInductor compiler wrapper folder) must be owned by this user and not "
                f"writable by others; remove it or set {ENV_WRAPPER_DIR} to a private folder"
            )
    else:
        os.makedirs(directory, exist_ok=True)
    return directory


def compiler_wrapper(mode: str = DEFAULT_LINK_MODE, compiler: Optional[str] = None,
                     directory: Optional[str] = None) -> str:
    """Write the compiler wrapper of ``mode`` (if it is not there as it should be); return its path.

    Args:
        mode: a key of :data:`LINK_MODES` other than ``"torch"``.
        compiler: the real compiler, a path or a name on ``PATH`` (default: the one inductor
            would pick: ``torch._inductor.config.cpp.cxx``, ``$CXX``, else ``g++``).
        directory: where to write it (default: ``$TORCHREC_HSTU_AOTI_WRAPPER_DIR``, else a
            private per-user folder under the temp dir).

    Returns:
        The wrapper's path; its file name ends with the compiler's, as inductor picks its GCC or
        clang flags by name.

    Raises:
        ValueError: an unknown mode, or ``"torch"``.
        RuntimeError: no compiler, or a default folder that is not private to this user.

    Example::

        configs = {"cpp.cxx": (compiler_wrapper(),)}
        torch._inductor.aoti_compile_and_package(program, inductor_configs=configs)
    """
    if LINK_MODES.get(mode) is None:
        raise ValueError(f"mode must be one of {[k for k, v in LINK_MODES.items() if v]}, got {mode!r}")
    compiler = compiler or _default_compiler()
    if not compiler:
        raise RuntimeError("AOTInductor needs a C++ compiler: none found (set CXX or install g++)")
    text = _script(compiler, cast(List[str], LINK_MODES[mode]))  # not None: checked above
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    directory = _private_directory(directory)
    path = os.path.join(directory, f"{mode}-{digest}-{os.path.basename(compiler)}")
    try:
        with open(path) as handle:
            if handle.read() == text and os.access(path, os.X_OK):
                return path
    except OSError:
        pass
    # A private scratch file, renamed into place: parallel writers never see a partial file.
    handle_fd, scratch = tempfile.mkstemp(dir=directory, prefix=".wrapper-")
    try:
        with os.fdopen(handle_fd, "w") as handle:
            handle.write(text)
        os.chmod(scratch, 0o700)
        os.replace(scratch, path)
    except BaseException:
        if os.path.exists(scratch):
            os.unlink(scratch)
        raise
    return path


def _runs(wrapper: str) -> bool:
    """Whether ``wrapper`` can be executed here (a ``noexec`` folder cannot); cached."""
    if wrapper not in _checked:
        try:
            subprocess.run([wrapper, "--version"], capture_output=True, timeout=60, check=True)
            _checked[wrapper] = True
        except (OSError, subprocess.SubprocessError) as err:
            logger.warning(
                "the AOTInductor compiler wrapper %s cannot run (%s): packages are linked with inductor's "
                "own command; set %s to a folder that allows running files", wrapper, err, ENV_WRAPPER_DIR,
            )
            _checked[wrapper] = False
    return _checked[wrapper]


def link_configs(mode: Optional[str] = None) -> Dict[str, Any]:
    """Inductor configs that link a package's C++ library with ``mode``.

    Args:
        mode: a key of :data:`LINK_MODES`; default ``$TORCHREC_HSTU_AOTI_LINK``, else
            :data:`DEFAULT_LINK_MODE`. ``"torch"`` gives ``{}`` (inductor's own command).

    Returns:
        ``{"cpp.cxx": (wrapper,)}`` on Linux (GNU-style linkers); ``{}`` for ``"torch"``,
        elsewhere, without a compiler (inductor then reports that itself) or where the wrapper
        cannot run (logged as a warning).

    Raises:
        ValueError: an unknown mode.
    """
    mode = mode or os.environ.get(ENV_LINK_MODE) or DEFAULT_LINK_MODE
    if mode not in LINK_MODES:
        raise ValueError(f"{ENV_LINK_MODE} (mode) must be one of {sorted(LINK_MODES)}, got {mode!r}")
    if LINK_MODES[mode] is None or not sys.platform.startswith("linux"):
        return {}
    compiler = _default_compiler()
    if not compiler:
        return {}
    wrapper = compiler_wrapper(mode, compiler)
    return {"cpp.cxx": (wrapper,)} if _runs(wrapper) else {}
